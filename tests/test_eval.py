"""Evaluation: few-shot prompts from train examples only, exact-match scoring, the `chatstack eval` JSON contract."""

import json

import pytest
import torch

from chatstack.checkpoint import save_checkpoint
from chatstack.cli import main
from chatstack.data.tasks import TASKS
from chatstack.evals.fewshot import fewshot_prompt, shots_for
from chatstack.evals.tasks_eval import default_mode, evaluate_tasks, mean_accuracy
from chatstack.infer.engine import Completion, Engine
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.tokenizer import Tokenizer

TEXT = "Hello there, how are you? What is 12 + 30? Which is larger, 417 or 392? It is 42. Answer: 7. " * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    tok = Tokenizer.train([TEXT], vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    m = GPT(get_preset("nano", vocab_size=tok.vocab_size, block_size=256))
    for stage in ("base", "sft"):
        save_checkpoint(d / stage, m, {"stage": stage, "model": m.config.to_dict(), "tokenizer": tok.info()}, tok)
    convs = d / "val.jsonl"
    convs.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]})
        + "\n"
    )
    return d, m, tok


def test_fewshot_prompt_uses_train_examples_only():
    t = TASKS["add"]
    test_prompts = {e.prompt for e in t.examples("test", 50)}
    shots = shots_for(t, 3)
    assert len(shots) == 3 and not {s.prompt for s in shots} & test_prompts
    ex = t.examples("test", 1)[0]
    p = fewshot_prompt(t, ex, shots=3)
    assert p.endswith(f"Q: {ex.prompt}\nA:") and p.count("Q: ") == 4 and ex.final not in p.split("\n\n")[-1]
    assert fewshot_prompt(t, ex, shots=0) == f"Q: {ex.prompt}\nA:"


def test_default_mode_by_stage():
    assert default_mode({"stage": "base"}) == "fewshot"
    assert default_mode({"stage": "sft"}) == "chat" and default_mode({"stage": "ppo"}) == "chat"


def fake_generate(answer_of):
    def gen(self, prompts, params=None, progress=False):
        return [Completion(p, [], answer_of(self.tok.decode(p)), "stop") for p in prompts]

    return gen


def test_scoring_with_an_oracle_and_a_wrong_model(setup, monkeypatch):
    """Plumbing check independent of any model: a reply of the reference answer scores 1, a wrong one 0."""
    _, m, tok = setup
    lookup = {}
    for t in TASKS.values():
        for e in t.examples("test", 5):
            lookup[e.prompt] = e.answer

    def oracle(text):
        q = (
            text.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
            if "<|im_start|>" in text
            else text.rsplit("Q: ", 1)[1][: -len("\nA:")]
        )
        return lookup[q]

    monkeypatch.setattr(Engine, "generate", fake_generate(oracle))
    for mode in ("chat", "fewshot"):
        res = evaluate_tasks(m, tok, n=5, mode=mode)
        assert set(res) == set(TASKS)
        assert all(r["accuracy"] == 1.0 and r["well_formed"] == 1.0 and r["n"] == 5 for r in res.values())
        assert mean_accuracy(res) == 1.0
    monkeypatch.setattr(Engine, "generate", fake_generate(lambda text: "Answer: 99999"))
    res = evaluate_tasks(m, tok, ["add", "reverse"], n=4)
    assert res["add"]["accuracy"] == 0.0 and res["add"]["well_formed"] == 1.0
    assert res["reverse"]["well_formed"] == 0.0


def test_real_generation_counts(setup):
    _, m, tok = setup
    res = evaluate_tasks(m, tok, ["add", "count"], n=3, mode="fewshot", max_new_tokens=4)
    assert {k: v["n"] for k, v in res.items()} == {"add": 3, "count": 3}
    assert all(0.0 <= v["accuracy"] <= 1.0 and len(v["samples"]) == 3 for v in res.values())


def test_cli_json_contract(setup, capsys):
    d, _, _ = setup
    rc = main(
        [
            "eval",
            str(d / "sft"),
            "--json",
            "--n",
            "2",
            "--task",
            "add",
            "compare",
            "--data",
            str(d / "val.jsonl"),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["tasks"]) == {"add", "compare"}
    for r in res["tasks"].values():
        assert isinstance(r["accuracy"], float) and r["n"] == 2
    assert res["mode"] == "chat" and 0.0 <= res["mean_accuracy"] <= 1.0 and res["conversation_loss"] > 0
    assert json.loads((d / "sft" / "eval.json").read_text())["tasks"].keys() == res["tasks"].keys()
    rc = main(
        ["eval", str(d / "base"), "--n", "2", "--task", "add", "--no-loss", "--out", str(d / "b.json"), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "few" in out and "mean" in out and json.loads((d / "b.json").read_text())["mode"] == "fewshot"
    assert main(["eval", str(d / "missing"), "--no-progress"]) == 2
