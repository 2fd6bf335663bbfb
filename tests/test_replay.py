"""Self-distillation replay (chatstack.data.replay): the base model's own replies join the SFT mix."""

import json

import pytest
import torch

from chatstack.checkpoint import load_checkpoint, read_config, save_checkpoint
from chatstack.data.replay import replay_conversations, replay_prompts, trim_reply
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.stages.sft import SFTConfig, run_sft
from chatstack.tokenizer import Tokenizer

TEXT = "Hello there, how are you? What is economics? It is the study of money. Tell me a joke. " * 20


def test_a_cut_reply_keeps_its_whole_sentences():
    assert trim_reply("  It is blue. The sky is ", ended=False) == "It is blue."
    assert trim_reply("Yes! Really? I think so. and then", ended=False) == "Yes! Really? I think so."
    assert trim_reply("no sentence end at all", ended=False) == ""
    assert trim_reply("An ended reply without a stop ", ended=True) == "An ended reply without a stop"
    assert trim_reply("Version 2.5 is out and", ended=False) == ""  # a decimal point ends no sentence


def test_prompts_are_distinct_questions_and_fixed_by_the_seed():
    a, b = replay_prompts(50, seed=0), replay_prompts(50, seed=0)
    assert a == b and len(a) == 50 and len({q.lower() for q in a}) == 50
    assert replay_prompts(50, seed=1) != a


def test_replies_are_cached_for_the_same_prompts(tmp_path):
    calls = []

    def gen(qs):
        calls.append(list(qs))
        return [(f"Answer to {q}. And more", False) for q in qs]

    qs = ["what is a cat", "hello"]
    convs = replay_conversations(tmp_path / "r.jsonl", qs, gen)
    assert convs[0] == [
        {"role": "user", "content": "what is a cat"},
        {"role": "assistant", "content": "Answer to what is a cat."},
    ]
    assert replay_conversations(tmp_path / "r.jsonl", qs, gen) == convs and len(calls) == 1
    replay_conversations(tmp_path / "r.jsonl", qs[:1], gen)  # other prompts: generated again
    assert len(calls) == 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    tok = Tokenizer.train([TEXT], vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    m = GPT(get_preset("nano", vocab_size=tok.vocab_size, block_size=128))
    save_checkpoint(d / "base", m, {"stage": "base", "model": m.config.to_dict(), "tokenizer": tok.info()}, tok)
    return d


def _cfg(base, out: str, replay_weight: int, **kw) -> SFTConfig:
    """A 1-2 step SFT of the nano base on a few task conversations plus the replay source."""
    mix = f"tasks=0.05,chitchat=0,chatterbot=0,identity=0,replay={replay_weight}"
    common = dict(tasks_per_task=20, batch_size=2, eval_every=0, time_budget=0, progress=False)
    return SFTConfig(base=str(base / "base"), out=str(base / out), mix=mix, **common, **kw)


def test_sft_trains_on_the_base_models_own_greedy_replies(base):
    cfg = _cfg(base, "sft", 1, replay=12, replay_tokens=60, max_steps=2, warmup_steps=1)
    run_sft(cfg, log=lambda s: None)
    rows = [json.loads(line) for line in open(base / "sft" / "replay.jsonl")]
    assert [r["prompt"] for r in rows] == replay_prompts(12, cfg.seed)
    # the replies are what the base model says greedily, through the engine's own chat path
    ck = load_checkpoint(base / "base")
    eng = Engine(ck.model.eval(), ck.tokenizer)
    for r in rows:
        got = eng.chat([{"role": "user", "content": r["prompt"]}], SamplingParams(max_new_tokens=60, temperature=0.0))
        want = trim_reply(got.text, got.finish_reason == "stop")
        assert (r["messages"][1]["content"] if r["messages"] else "") == want
    kept = sum(1 for r in rows if r["messages"])  # a random model rarely ends a sentence: often none
    assert read_config(base / "sft")["data"]["train"]["sources"].get("replay", 0) == kept


def test_replay_weight_repeats_the_replies(base, monkeypatch):
    from chatstack.infer.engine import Completion

    def fake_generate(self, prompts, params=None, progress=False):
        return [Completion(list(p), [1], "Fine. And you?", "stop") for p in prompts]

    monkeypatch.setattr(Engine, "generate", fake_generate)
    cfg = _cfg(base, "sft2", 2, replay=5, max_steps=1)
    run_sft(cfg, log=lambda s: None)
    assert read_config(base / "sft2")["data"]["train"]["sources"]["replay"] == 10
    rows = [json.loads(line) for line in open(base / "sft2" / "replay.jsonl")]
    assert all(r["messages"][1] == {"role": "assistant", "content": "Fine. And you?"} for r in rows)


def test_replay_without_a_count_is_a_clear_error(base):
    cfg = SFTConfig(base=str(base / "base"), out=str(base / "bad"), mix="replay=1", replay=0, progress=False)
    with pytest.raises(ValueError, match="--replay is 0"):
        run_sft(cfg, log=lambda s: None)
