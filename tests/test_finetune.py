"""Fine-tuning a pretrained model cheaply: --seq-len, --grad-checkpoint, LoRA (peft), --train-layers.

    python3 -m pytest -q tests/test_finetune.py

References: gradients with and without activation checkpointing; peft's LoRA forward against the merged
weights; the base weights a frozen run must leave bit-identical.
"""

import json

import pytest
import torch
from helpers import nano_model

from chatstack.checkpoint import load_checkpoint, read_config, save_checkpoint
from chatstack.cli import main
from chatstack.data.conversations import resolve_seq_len
from chatstack.data.tasks import task_conversations
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.stages.sft import SFTConfig, SFTTask, run_sft
from chatstack.tokenizer import Tokenizer

peft = pytest.importorskip("peft")

from chatstack.train.lora import apply_lora, freeze_all_but_last, unwrap_lora  # noqa: E402

TEXT = "Hello there, how are you? What is 12 + 30? Which is larger, 417 or 392? It is 42. Answer: 7. " * 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    tok = Tokenizer.train([TEXT], vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    m = GPT(get_preset("nano-llama", vocab_size=tok.vocab_size, block_size=128))
    save_checkpoint(d / "base", m, {"stage": "base", "model": m.config.to_dict(), "tokenizer": tok.info()}, tok)
    with open(d / "data.jsonl", "w") as f:
        for c in task_conversations("train", 40, names=["add", "compare"]):
            f.write(json.dumps({"messages": c["messages"]}) + "\n")
    return d


def cfg(d, **kw):
    c = dict(base=str(d / "base"), out=str(d / "sft"), data=[str(d / "data.jsonl")], max_steps=6, batch_size=4)
    c.update(lr=3e-3, warmup_steps=2, eval_every=0, log_every=1, time_budget=0, progress=False)
    c.update(kw)
    return SFTConfig(**c)


def _grads(model, x, y, mask=None):
    model.zero_grad()
    _, loss = model(x, y, attn_mask=mask)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["nano", "nano-llama"])
def test_grad_checkpoint_gives_the_same_gradients(family):
    model = nano_model(family, dropout=0.0).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 320, (2, 24), generator=g), torch.randint(0, 320, (2, 24), generator=g)
    mask = torch.ones(24, 24, dtype=torch.bool).tril()[None, None].expand(2, 1, 24, 24).clone()
    mask[0, 0, 12:, :12] = False  # two packed documents in row 0
    for m in (None, mask):
        want = _grads(model, x, y, m)
        model.grad_checkpoint = True
        got = _grads(model, x, y, m)
        model.grad_checkpoint = False
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)


def test_seq_len_rows_and_errors(base, tmp_path, capsys):
    assert resolve_seq_len(0, 8192) == 1024 and resolve_seq_len(0, 128) == 128 and resolve_seq_len(40, 128) == 40
    with pytest.raises(ValueError, match="--seq-len 200 exceeds"):
        resolve_seq_len(200, 128)
    path = run_sft(cfg(base, out=str(tmp_path / "s"), seq_len=34, max_steps=2), log=lambda s: None)
    conf = read_config(path)
    assert (
        conf["train"]["seq_len"] == 34
        and conf["data"]["train"]["truncated"] + conf["data"]["train"]["dropped_long"] > 0
    )  # the task conversations are ~30 tokens: a 35-token row drops the 37-token ones
    task_rows = []
    orig = SFTTask.__init__

    def spy(self, train_rows, *a, **k):
        task_rows.append(train_rows)
        orig(self, train_rows, *a, **k)

    SFTTask.__init__ = spy
    try:
        run_sft(cfg(base, out=str(tmp_path / "s2"), seq_len=64, max_steps=1), log=lambda s: None)
    finally:
        SFTTask.__init__ = orig
    assert task_rows[0].ids.shape[1] == 65 and len(task_rows[0]) < 76  # 76 conversations, some packed 2 a row
    args = ["sft", "--base", str(base / "base"), "--data", str(base / "data.jsonl"), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "o"), "--seq-len", "500"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seq-len 500 exceeds the model's context length (block_size 128)" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_lora_forward_equals_merged_weights():
    model = nano_model("nano-llama")
    names = apply_lora(model, rank=4, alpha=8, targets="qkv,mlp.fc")
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at 0; make the update visible
    x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)  # peft's forward: W x + (alpha/r) B A x
        unwrap_lora(model, merge=True)
        got = model(x)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (want - nano_model("nano-llama")(x)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lora_sft_trains_only_adapted_matrices_and_merges(base, tmp_path):
    merged = run_sft(cfg(base, out=str(tmp_path / "m"), lora_rank=4), log=lambda s: None)
    apart = run_sft(cfg(base, out=str(tmp_path / "a"), lora_rank=4, lora_merge=False), log=lambda s: None)
    b = load_checkpoint(base / "base").model.state_dict()
    m = load_checkpoint(merged).model.state_dict()
    for k in b:
        changed = not torch.equal(b[k], m[k])
        assert changed == (k.endswith(("qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"))), k
    assert read_config(merged)["finetune"]["lora"] == {"rank": 4, "alpha": 8.0, "modules": 8}
    # --no-lora-merge: the base weights on disk, the adapters beside them, the same model once loaded
    assert (apart / "adapter.safetensors").exists() and not (merged / "adapter.safetensors").exists()
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(str(apart / "model.safetensors"))["blocks.0.mlp.fc.weight"], b["blocks.0.mlp.fc.weight"]
    )
    a = load_checkpoint(apart).model.state_dict()
    for k in b:
        torch.testing.assert_close(a[k], m[k], atol=1e-6, rtol=1e-5)


def test_lora_resume_is_exact(base, tmp_path, monkeypatch):
    full = run_sft(cfg(base, out=str(tmp_path / "full"), lora_rank=4, max_steps=8), log=lambda s: None)
    real = SFTTask.train_batch

    def crash_at_5(self, step, micro, rank, world):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step, micro, rank, world)

    monkeypatch.setattr(SFTTask, "train_batch", crash_at_5)
    kw = dict(out=str(tmp_path / "part"), lora_rank=4, max_steps=8, save_every=4)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg(base, **kw), log=lambda s: None)
    monkeypatch.setattr(SFTTask, "train_batch", real)
    run_sft(cfg(base, resume=True, **kw), log=lambda s: None)
    a, b = load_checkpoint(full).model.state_dict(), load_checkpoint(tmp_path / "part").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_bad_lora_target_names_the_flag(base, tmp_path, capsys):
    args = ["sft", "--base", str(base / "base"), "--data", str(base / "data.jsonl"), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "o"), "--lora-rank", "4", "--lora-targets", "qkv,q_proj"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lora-targets: 'q_proj' matches no Linear module" in err and "attn.qkv" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    assert main(args + ["--out", str(tmp_path / "o"), "--lora-rank", "4", "--train-layers", "1"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_train_layers_freezes_all_but_the_last_blocks(base, tmp_path):
    model = nano_model("nano-llama")
    n = freeze_all_but_last(model, 1)
    assert n == sum(p.numel() for p in model.blocks[1].parameters()) + model.norm_f.weight.numel() + (
        model.lm_head.weight.numel()
    )  # nano-llama's output layer is untied
    with pytest.raises(ValueError, match="--train-layers 3: the model has 2 blocks"):
        freeze_all_but_last(model, 3)
    path = run_sft(cfg(base, out=str(tmp_path / "t"), train_layers=1), log=lambda s: None)
    b, t = load_checkpoint(base / "base").model.state_dict(), load_checkpoint(path).model.state_dict()
    for k in b:
        assert torch.equal(b[k], t[k]) == (k.startswith("blocks.0.") or k == "tok_emb.weight"), k


def test_reward_model_lora_keeps_its_head_trainable():
    from chatstack.rlhf.reward_model import RewardModel

    rm = RewardModel.from_lm(nano_model("nano-llama"), "mean")
    apply_lora(rm, rank=2, alpha=4, targets="qkv")
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("lora" not in n for n in trainable)
    assert all("lora" in n or not n.startswith(("lm.", "gpt.", "model.")) for n in trainable), trainable


def test_ppo_with_lora_resumes_exactly_and_keeps_the_base(tmp_path, monkeypatch):
    from helpers import make_checkpoint

    import chatstack.stages.ppo as ppo_mod

    make_checkpoint(tmp_path / "sft", "nano-llama", block_size=96)
    g = torch.Generator().manual_seed(0)
    fake = (torch.randint(0, 320, (4000,), generator=g), torch.randint(0, 320, (2000,), generator=g), "test")
    monkeypatch.setattr(ppo_mod, "pretraining_tokens", lambda cfg, t: fake)
    common = ["ppo", "--policy", str(tmp_path / "sft"), "--reward", "judge", "--tasks", "add,compare"]
    common += ["--rollout-batch", "4", "--minibatch", "4", "--max-new-tokens", "4", "--eval-n", "1"]
    common += ["--eval-every", "0", "--save-every", "2", "--time-budget", "0", "--no-progress", "--lr", "1e-2"]
    common += ["--lora-rank", "2", "--lora-targets", "qkv"]
    assert main(common + ["--out", str(tmp_path / "a"), "--iterations", "4"]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--iterations", "2"]) == 0
    st = torch.load(tmp_path / "b" / "state" / "ppo.pt", weights_only=True)
    assert any("lora_A" in k for k in st["lora"]) and any("value_head" in k for k in st["lora"])
    st["max_iters"] = 4
    torch.save(st, tmp_path / "b" / "state" / "ppo.pt")
    assert main(common + ["--out", str(tmp_path / "b"), "--iterations", "4", "--resume"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    errs = [r["engine_logprob_err"] for r in rows if "engine_logprob_err" in r]
    assert errs and max(errs) < 1e-4  # rollouts sample from the adapted policy, not the frozen base
    base = load_checkpoint(tmp_path / "sft").model.state_dict()
    a, b = load_checkpoint(tmp_path / "a").model.state_dict(), load_checkpoint(tmp_path / "b").model.state_dict()
    for k in base:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], base[k]) == (not k.endswith("attn.qkv.weight")), k


def test_reward_stage_with_lora_and_seq_len(nano_ckpt, tmp_path):
    from safetensors.torch import load_file

    from chatstack.rlhf.reward_model import load_reward_model
    from chatstack.stages.reward import RewardConfig, train_reward

    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for a in range(24):
            f.write(json.dumps({"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": f"{a} cat"}) + "\n")
    kw = dict(sft=str(nano_ckpt), data=[str(data)], max_steps=4, eval_every=0, time_budget=0, warmup_steps=1)
    train_reward(RewardConfig(out=str(tmp_path / "rm"), lora_rank=2, seq_len=48, progress=False, **kw))
    rm, cfg = load_reward_model(tmp_path / "rm")
    assert cfg["finetune"]["lora"]["rank"] == 2 and cfg["train"]["seq_len"] == 48
    base, got = load_file(str(nano_ckpt / "model.safetensors")), load_file(str(tmp_path / "rm" / "model.safetensors"))
    assert torch.equal(got["gpt.blocks.0.norm1.weight"], base["blocks.0.norm1.weight"])  # frozen
    assert not torch.equal(got["gpt.blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])  # adapted, merged
    with pytest.raises(ValueError, match="--seq-len 500 exceeds"):
        train_reward(RewardConfig(out=str(tmp_path / "rm2"), seq_len=500, progress=False, **kw))


def test_grad_checkpoint_default_follows_the_activation_estimate(base, tmp_path, monkeypatch):
    import chatstack.model as model_mod
    import chatstack.train.loop as loop_mod

    calls = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_sft(cfg(base, out=str(tmp_path / "a"), max_steps=1), log=lambda s: None)
    assert calls == []  # a nano model's activations are far below the threshold
    monkeypatch.setattr(loop_mod, "AUTO_RECOMPUTE_BYTES", 0)
    run_sft(cfg(base, out=str(tmp_path / "b"), max_steps=1), log=lambda s: None)
    assert len(calls) == 2  # one per block of the nano model's one training step
    calls.clear()
    run_sft(cfg(base, out=str(tmp_path / "c"), max_steps=1, grad_checkpoint=False), log=lambda s: None)
    assert calls == []
