"""Group-baseline RL and DPO cores (chatstack/rlhf/group.py), temperature-consistent log-probs through the
engine and the update, and the `chatstack rl` command: learning, exact resume, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from chatstack.infer.engine import Engine, SamplingParams
from chatstack.infer.sampling import filtered_probs
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.rlhf import ppo_core as pc
from chatstack.rlhf.group import dpo_loss, group_advantages, sequence_logprobs
from chatstack.rlhf.rollout import PolicyWithValue, build_rows, rollout


@pytest.fixture(scope="module")
def tok():
    from chatstack.tokenizer import Tokenizer

    return Tokenizer.train(
        ["What is 12 + 34? 46. Reverse the letters: c a t. Answer: 7"] * 3, vocab_size=300, show_progress=False
    )


def _nano(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(get_preset("nano", vocab_size=tok.vocab_size, block_size=96))


def test_rloo_and_grpo_advantages_by_brute_force():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0, -1.0, 2.0, 0.5, 0.5])
    K = 4
    adv, keep = group_advantages(r, K, "rloo")
    adv_g, _ = group_advantages(r, K, "grpo")
    adv_s, _ = group_advantages(r, K, "grpo", scale="std")
    for g in range(3):
        grp = r[g * K : (g + 1) * K].tolist()
        for i in range(K):
            others = [grp[j] for j in range(K) if j != i]
            flat = len(set(grp)) == 1
            want = 0.0 if flat else grp[i] - sum(others) / (K - 1)
            assert adv[g * K + i].item() == pytest.approx(want)
            assert adv_g[g * K + i].item() == pytest.approx(0.0 if flat else grp[i] - sum(grp) / K)
            if not flat:
                std = torch.tensor(grp).std().item()
                assert adv_s[g * K + i].item() == pytest.approx((grp[i] - sum(grp) / K) / (std + 1e-6), rel=1e-4)
            assert bool(keep[g * K + i]) == (not flat)  # the all-equal group is dropped
    with pytest.raises(ValueError, match="algo"):
        group_advantages(r, K, "ppo2")
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(r, 1, "rloo")


def test_per_sequence_normalisation_weighs_answers_equally():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert pc.reduce_loss(x, m, "seq").item() == pytest.approx((1.0 + 3.0) / 2)
    assert pc.reduce_loss(x, m, "token").item() == pytest.approx(7.0 / 5)
    assert pc.reduce_loss(x, m, "sum", horizon=8.0).item() == pytest.approx((4.0 + 3.0) / 2 / 8.0)
    with pytest.raises(ValueError, match="'sum'"):
        pc.reduce_loss(x, m, "mean")


def test_summed_loss_is_the_policy_gradient():
    """With norm "sum" and fresh samples (ratio 1), the surrogate's gradient is -(1/H) * mean_b A_b * grad log pi(y_b):
    the REINFORCE gradient of the answers' whole log-probabilities, whatever their lengths."""
    torch.manual_seed(0)
    theta = torch.randn(2, 5, requires_grad=True)  # per-row "logits" over positions (stand-in log-probs)
    logp = torch.log_softmax(theta, -1)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([[0.7] * 5, [-1.3] * 5]) * mask
    loss, _ = pc.policy_loss(logp, logp.detach(), adv, mask, norm="sum", horizon=4.0)
    (g,) = torch.autograd.grad(loss, theta)
    seq_logp = (torch.log_softmax(theta, -1) * mask).sum(1)
    (want,) = torch.autograd.grad(-(torch.tensor([0.7, -1.3]) * seq_logp).mean() / 4.0, theta)
    assert torch.allclose(g, want, atol=1e-6)


def test_dpo_loss_by_hand():
    pw, pl, rw, rl = map(torch.tensor, ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    loss, st = dpo_loss(pw, pl, rw, rl, beta=0.5)
    m = [0.5 * ((-1 + 2) - (-3 + 2)), 0.5 * ((-2 + 2) - (-1 + 2))]
    want = sum(-F.logsigmoid(torch.tensor(v)).item() for v in m) / 2
    assert loss.item() == pytest.approx(want) and st["reward_accuracy"] == 0.5


@pytest.mark.parametrize("temperature", [0.6, 1.4])
def test_logprobs_follow_the_sampling_temperature(tok, temperature):
    lm = _nano(tok)
    policy, ref = PolicyWithValue(lm), _nano(tok)
    eng = Engine(lm, tok, max_batch_size=8)
    prompts = [tok.render_prompt([{"role": "user", "content": f"What is {i} + 1?"}]) for i in range(4)]
    params = [
        SamplingParams(max_new_tokens=5, temperature=temperature, logprobs=True, scaled_logprobs=True, seed=i)
        for i in range(4)
    ]
    ro = rollout(eng, policy, ref, _ConstReward(), tok, prompts, params, temperature)
    assert ro.engine_logprob_err < 1e-4  # engine and update agree at T != 1
    # and both are the log-probs of the distribution sampled from: softmax(logits / T), as sampling.py draws
    row = ro.idx[0, : ro.prompt_lens[0]][None]
    logits = lm(row)[0, -1][None]
    probs, ids = filtered_probs(logits, torch.tensor([temperature]), torch.tensor([0]), torch.tensor([1.0]))
    first = ro.resp[0, 0].item()
    want = probs[0, (ids[0] == first).nonzero()[0, 0]].log().item()
    assert ro.logp[0, 0].item() == pytest.approx(want, abs=1e-5)
    raw = F.log_softmax(logits[0].float(), -1)[first].item()
    assert abs(raw - want) > 1e-4  # the raw log-prob would be a different number
    plain = eng.generate(prompts[:1], SamplingParams(max_new_tokens=5, temperature=temperature, logprobs=True, seed=0))
    assert plain[0].logprobs[0] == pytest.approx(raw, abs=1e-5)  # without scaled_logprobs: the raw distribution


class _ConstReward(torch.nn.Module):
    def forward(self, idx, lengths, starts=None):
        return torch.zeros(idx.size(0))


def test_sequence_logprobs_sum_the_response_tokens(tok):
    lm = _nano(tok)
    idx, plen, resp, mask = build_rows([[5, 6, 7], [8, 9]], [[20, 21], [22, 23, 24]], tok.eot_id)
    got = sequence_logprobs(lm, idx, plen, resp, mask)
    for i, (p, r) in enumerate(zip([[5, 6, 7], [8, 9]], [[20, 21], [22, 23, 24]])):
        lp = F.log_softmax(lm(torch.tensor([p + r]))[0].float(), -1)
        want = sum(lp[len(p) - 1 + t, tok_].item() for t, tok_ in enumerate(r))
        assert got[i].item() == pytest.approx(want, abs=1e-4)


@pytest.fixture()
def sft_ckpt(tok, tmp_path, monkeypatch):
    from chatstack.checkpoint import save_checkpoint
    from chatstack.stages import ppo as ppo_mod

    lm = _nano(tok)
    sft = tmp_path / "sft"
    save_checkpoint(sft, lm, {"stage": "sft", "model": lm.config.to_dict(), "tokenizer": tok.info()}, tok)
    g = torch.Generator().manual_seed(0)
    fake = (
        torch.randint(0, tok.vocab_size, (4000,), generator=g),
        torch.randint(0, tok.vocab_size, (2000,), generator=g),
        "test",
    )
    monkeypatch.setattr(ppo_mod, "pretraining_tokens", lambda cfg, t: fake)
    return sft


def _rows(path):
    drop = {"rollout_s", "iter_s", "elapsed_s", "eval_s"}
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in open(path / "metrics.jsonl")]


def test_rl_command_resumes_exactly_and_logs_reward_and_kl(sft_ckpt, tmp_path):
    from chatstack.cli import main

    common = [
        "rl",
        "--policy",
        str(sft_ckpt),
        "--reward",
        "judge",
        "--algo",
        "rloo",
        "--group",
        "4",
        "--rollout-batch",
        "4",
        "--minibatch",
        "8",
        "--max-new-tokens",
        "5",
        "--eval-n",
        "2",
        "--save-every",
        "2",
        "--no-progress",
        "--lr",
        "3e-3",
        "--tasks",
        "count,compare",
        "--temperature",
        "1.5",
        "--logit-scale-lr",
        "1e-2",
    ]
    assert main(common + ["--out", str(tmp_path / "a"), "--iterations", "4"]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--iterations", "2"]) == 0
    st = torch.load(tmp_path / "b" / "state" / "ppo.pt", weights_only=True)
    st["max_iters"] = 4
    torch.save(st, tmp_path / "b" / "state" / "ppo.pt")
    assert main(common + ["--out", str(tmp_path / "b"), "--iterations", "4", "--resume"]) == 0
    rows_a = [r for r in _rows(tmp_path / "a") if not r.get("eval")]
    assert rows_a == [r for r in _rows(tmp_path / "b") if not r.get("eval")]
    assert len(rows_a) == 4 and all("reward" in r and "kl" in r and "kept_frac" in r for r in rows_a)
    assert any(r["logit_scale"] != 1.0 for r in rows_a)  # the scale trained, and resumed exactly (rows equal)
    assert all(r["engine_logprob_err"] < 1e-4 for r in rows_a)
    conf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert conf["stage"] == "rl" and conf["algo"] == "rloo"


@pytest.mark.parametrize("flags,msg", [(["--algo", "reinforce"], "--algo"), (["--group", "1"], "--group")])
def test_rl_bad_input_is_one_line_naming_the_flag(sft_ckpt, tmp_path, capsys, flags, msg):
    from chatstack.cli import main

    rc = main(["rl", "--policy", str(sft_ckpt), "--reward", "judge", "--out", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1


def test_rl_with_a_reward_checkpoint_as_policy_is_one_line(sft_ckpt, tmp_path, capsys):
    from chatstack.checkpoint import load_checkpoint, save_checkpoint
    from chatstack.cli import main
    from chatstack.rlhf.reward_model import RewardModel

    ck = load_checkpoint(sft_ckpt)
    rm = RewardModel.from_lm(ck.model)
    cfg = {"kind": "reward", "stage": "reward", "model": ck.model.config.to_dict(), "tokenizer": ck.tokenizer.info()}
    save_checkpoint(tmp_path / "rm", rm, cfg, ck.tokenizer)
    for argv, flag in (
        (["--policy", str(tmp_path / "rm"), "--reward", "judge"], "--policy"),
        (["--policy", str(sft_ckpt), "--reward", str(sft_ckpt)], "expected 'reward'"),
    ):
        assert main(["rl", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert flag in err and len(err.splitlines()) == 1


def test_the_final_norm_gets_its_own_learning_rate():
    """--final-norm-lr-mult: the final norm's parameters form their own optimizer group whose lr is the multiple."""
    from chatstack.train.optim import build_adamw
    from tests.helpers import nano_model

    model = nano_model()
    norm = list(model.norm_f.parameters())
    for p in norm:
        p.lr_scale = 30.0  # as chatstack.stages.ppo sets it
    opt = build_adamw(model, 1e-3, 0.1)
    scaled = [g for g in opt.param_groups if g.get("lr_scale") == 30.0]
    assert {id(p) for g in scaled for p in g["params"]} == {id(p) for p in norm}
    n_params = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params  # every parameter exactly once
    for g in opt.param_groups:  # as the RL loop sets them
        g["lr"] = 1e-4 * g.get("lr_scale", 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    _, loss = model(x, targets=x)
    loss.backward()
    opt.step()
    moved = {id(p): (p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)}
    # Adam's first step moves a parameter by about its lr: the norm's by ~3e-3, the rest by ~1e-4
    assert max(moved[id(p)] for p in norm) > 1e-3
    assert max(v for k, v in moved.items() if k not in {id(p) for p in norm}) < 5e-4


def test_rl_with_lora_trains_the_adapters_and_the_final_norm(sft_ckpt, tmp_path):
    """Under LoRA the final norm stays trainable (--final-norm-lr-mult, default 50): the merged checkpoint
    differs from the SFT model in the adapted matrices and the final norm, and nowhere else."""
    from chatstack.checkpoint import load_checkpoint
    from chatstack.cli import main

    # --algo ppo: its value head gives every answer an advantage, so an untrained model's all-wrong groups
    # still produce a gradient
    args = ["rl", "--policy", str(sft_ckpt), "--reward", "judge", "--tasks", "add,compare", "--algo", "ppo"]
    args += ["--group", "2", "--rollout-batch", "4", "--minibatch", "8", "--max-new-tokens", "4", "--eval-n", "1"]
    args += ["--lr", "1e-2"]
    args += ["--iterations", "2", "--warmup", "0", "--time-budget", "0", "--no-progress"]
    args += ["--lora-rank", "2", "--lora-targets", "qkv", "--out", str(tmp_path / "rl")]
    assert main(args) == 0
    base = load_checkpoint(sft_ckpt).model.state_dict()
    got = load_checkpoint(tmp_path / "rl").model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], got[k])}
    assert "norm_f.weight" in changed and any(k.endswith("attn.qkv.weight") for k in changed)
    assert all(k.startswith("norm_f.") or k.endswith("attn.qkv.weight") for k in changed), changed


@pytest.mark.parametrize("family", ["nano", "nano-llama"])
def test_logit_scale_is_a_temperature_and_its_gradient_is_the_chain_rule(family):
    """LogitScale: dL/ds from the norm's gradients equals autograd through an explicit e^s on the logits, and a
    step multiplies every logit by exactly e^(delta s) (LayerNorm with bias and RMSNorm alike)."""
    from chatstack.rlhf.logit_scale import LogitScale
    from tests.helpers import nano_model

    model = nano_model(family)
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    y = torch.randint(0, model.config.vocab_size, (2, 8))
    s = torch.zeros((), requires_grad=True)
    logits, _ = model(x, targets=y)
    (ds_ref,) = torch.autograd.grad(F.cross_entropy((logits * s.exp()).flatten(0, 1), y.flatten()), [s])
    _, loss = model(x, targets=y)
    loss.backward()
    scale = LogitScale(model.norm_f, lr=0.1)
    assert scale.grad() == pytest.approx(ds_ref.item(), rel=1e-4, abs=1e-7)
    with torch.no_grad():
        before, _ = model(x, targets=y)
    ds = scale.step()
    assert ds == pytest.approx(-0.1 if ds_ref.item() > 0 else 0.1, rel=1e-3)  # Adam's first step: lr * sign
    with torch.no_grad():
        after, _ = model(x, targets=y)
    torch.testing.assert_close(after, before * torch.tensor(ds).exp(), rtol=1e-4, atol=1e-5)
    assert scale.scale == pytest.approx(torch.tensor(ds).exp().item())
    again = LogitScale(model.norm_f, lr=0.1)
    again.load_state_dict(scale.state_dict())
    assert again.state_dict() == scale.state_dict()
