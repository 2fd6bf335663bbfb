"""PPO integration (chatstack/rlhf/rollout.py, chatstack/stages/ppo.py) on nano models: token alignment,
engine log-probs vs a full forward, learning a toy reward, and exact resume of `chatstack ppo`."""

import json

import pytest
import torch
import torch.nn as nn

from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.rlhf import ppo_core as pc
from chatstack.rlhf.rollout import PolicyWithValue, build_rows, response_logprobs, rollout
from chatstack.stages import ppo as ppo_mod


@pytest.fixture(scope="module")
def tok():
    from chatstack.tokenizer import Tokenizer

    return Tokenizer.train(
        ["What is 12 + 34? 46. Reverse the letters: c a t. Answer: 7"] * 3, vocab_size=300, show_progress=False
    )


def _nano(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(get_preset("nano", vocab_size=tok.vocab_size, block_size=96))


def test_response_positions_match_a_full_forward(tok):
    lm = _nano(tok)
    policy = PolicyWithValue(lm)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21], [22, 23, 24, 25], [26]]
    idx, plen, resp, mask = build_rows(prompts, responses, tok.eot_id)
    logits, values = policy(idx, plen, resp)
    assert logits.shape == (3, 4, lm.config.vocab_size) and values.shape == (3, 4)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        full = lm(torch.tensor([p + r]))[0]  # (len, V)
        for t in range(len(r)):
            # token r[t] is predicted at position len(p) - 1 + t
            assert torch.allclose(logits[i, t], full[len(p) - 1 + t], atol=1e-5)
    lp = response_logprobs(lm, idx, plen, resp)
    assert torch.allclose(lp * mask, pc.logprobs_of(logits, resp) * mask, atol=1e-6)


def test_rollout_logprobs_agree_with_engine(tok):
    lm = _nano(tok)
    policy = PolicyWithValue(lm)
    ref = _nano(tok)  # same seed: same weights as the policy
    rm = _ToyReward(tok)
    eng = Engine(lm, tok, max_batch_size=8)
    prompts = [tok.render_prompt([{"role": "user", "content": f"What is {i} + 1?"}]) for i in range(6)]
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, logprobs=True, seed=i) for i in range(6)]
    ro = rollout(eng, policy, ref, rm, tok, prompts, params)
    assert ro.engine_logprob_err < 1e-4  # KV-cache decode == full forward
    assert torch.allclose(ro.logp, ro.ref_logp, atol=1e-5)  # policy == reference at the start: KL 0
    lengths = ro.mask.sum(1)
    assert ((lengths >= 1) & (lengths <= 6)).all()
    assert (ro.values == 0).all()  # zero-initialised value head


class _ToyReward(nn.Module):
    """Scores an answer by the fraction of its tokens with even ids (a reward the policy can learn quickly)."""

    def __init__(self, tok):
        super().__init__()
        self.prompt_len = None
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, lengths, starts=None):
        out = []
        for row, n in zip(idx, lengths):
            # everything after the last <|im_start|>assistant\n is the answer; use the last 6 tokens as a proxy
            ans = row[max(0, int(n) - 6) : int(n)]
            out.append((ans % 2 == 0).float().mean())
        return torch.stack(out)


def test_ppo_iterations_raise_a_toy_reward(tok):
    lm = _nano(tok)
    policy = PolicyWithValue(lm)
    ref = _nano(tok)
    rm = _ToyReward(tok)
    eng = Engine(lm, tok, max_batch_size=32)  # default weight copies: they must follow fused AdamW
    cfg = ppo_mod.PPOConfig(kl_coef=0.0, ppo_epochs=2, minibatch=16, no_eos_penalty=0.0, max_new_tokens=6)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, fused=True)  # fused: as build_adamw picks on CPU
    kl_ctl = pc.make_kl_controller(0.0, None)
    prompts = [tok.render_prompt([{"role": "user", "content": f"q{i}"}]) for i in range(32)]
    g = torch.Generator().manual_seed(0)
    rewards, kls = [], []
    for it in range(12):
        params = [
            SamplingParams(max_new_tokens=6, temperature=1.0, logprobs=True, seed=1000 * it + i) for i in range(32)
        ]
        row = ppo_mod.ppo_iteration(policy, ref, rm, eng, tok, opt, kl_ctl, prompts, params, cfg, g)
        rewards.append(row["reward"])
        kls.append(row["kl"])
        assert 0.0 <= row["clipfrac"] <= 1.0 and row["approx_kl"] >= 0
        assert row["engine_logprob_err"] < 1e-4  # the engine samples from the policy being trained
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert kls[-1] > kls[0]  # it moved away from the reference to get there


@pytest.fixture()
def nano_run(tok, tmp_path, monkeypatch):
    from chatstack.checkpoint import save_checkpoint
    from chatstack.rlhf.reward_model import RewardModel

    lm = _nano(tok)
    sft = tmp_path / "sft"
    save_checkpoint(sft, lm, {"stage": "sft", "model": lm.config.to_dict(), "tokenizer": tok.info()}, tok)
    torch.manual_seed(1)
    rm = RewardModel.from_lm(lm)
    rmp = tmp_path / "rm"
    save_checkpoint(
        rmp, rm, {"kind": "reward", "stage": "reward", "model": lm.config.to_dict(), "tokenizer": tok.info()}, tok
    )
    # a small stand-in for the pretraining corpus (the real one takes seconds to tokenise)
    g = torch.Generator().manual_seed(0)
    fake = (
        torch.randint(0, tok.vocab_size, (4000,), generator=g),
        torch.randint(0, tok.vocab_size, (2000,), generator=g),
        "test",
    )
    monkeypatch.setattr(ppo_mod, "pretraining_tokens", lambda cfg, t: fake)
    return sft, rmp, tmp_path


def _rows(path):
    drop = {"rollout_s", "iter_s", "elapsed_s", "eval_s"}
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in open(path / "metrics.jsonl")]


def test_ppo_command_resumes_exactly(nano_run):
    from chatstack.cli import main

    sft, rm, tmp = nano_run
    common = [
        "ppo",
        "--policy",
        str(sft),
        "--reward",
        str(rm),
        "--rollout-batch",
        "8",
        "--minibatch",
        "4",
        "--max-new-tokens",
        "5",
        "--eval-n",
        "1",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--ptx-coef",
        "0.5",
        "--ptx-len",
        "16",
        "--ptx-batch",
        "2",
        "--time-budget",
        "0",
        "--no-progress",
        "--lr",
        "1e-3",
        "--target-kl",
        "1.0",
    ]
    assert main(common + ["--out", str(tmp / "a"), "--iterations", "4"]) == 0
    assert main(common + ["--out", str(tmp / "b"), "--iterations", "2"]) == 0
    # pretend the second run was cut after iteration 2 of 4: resume it with the full budget
    st = torch.load(tmp / "b" / "state" / "ppo.pt", weights_only=True)
    st["max_iters"] = 4
    torch.save(st, tmp / "b" / "state" / "ppo.pt")
    assert main(common + ["--out", str(tmp / "b"), "--iterations", "4", "--resume"]) == 0
    ra, rb = _rows(tmp / "a"), _rows(tmp / "b")
    train_a = [r for r in ra if not r.get("eval")]
    train_b = [r for r in rb if not r.get("eval")]
    assert [r["iter"] for r in train_a] == [1, 2, 3, 4]
    assert train_a == train_b
    for k in ("reward", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "response_length", "ptx_loss"):
        assert k in train_a[0]
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp / "a" / "model.safetensors")), load_file(str(tmp / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    cfg = json.loads((tmp / "a" / "config.json").read_text())
    assert cfg["stage"] == "ppo" and cfg["kind"] == "lm" and "eval" in cfg


def test_rounds_wiring(monkeypatch, tmp_path):
    """--rounds 3: round 1 uses the given RM; later rounds label the newest policy, train a fresh RM from it,
    and run PPO from it, always with the original SFT model as the KL reference; the last round writes OUT."""
    calls = []
    monkeypatch.setattr(ppo_mod, "label", lambda policy, out, cfg: calls.append(("label", policy, out)) or {})
    monkeypatch.setattr(
        ppo_mod, "train_reward", lambda cfg: calls.append(("reward", cfg.sft, cfg.data[0], cfg.out)) or {}
    )
    monkeypatch.setattr(
        ppo_mod, "run_ppo", lambda cfg: calls.append(("ppo", cfg.policy, cfg.reward, cfg.reference, cfg.out)) or cfg.out
    )
    out = str(tmp_path / "ppo")
    ppo_mod.run_rounds(ppo_mod.PPOConfig(policy="SFT", reward="RM0", out=out, rounds=3))
    w = str(tmp_path / "ppo.rounds")
    assert calls == [
        ("ppo", "SFT", "RM0", "SFT", f"{w}/round1/ppo"),
        ("label", f"{w}/round1/ppo", f"{w}/round2/ranks.jsonl"),
        ("reward", f"{w}/round1/ppo", f"{w}/round2/ranks.jsonl", f"{w}/round2/rm"),
        ("ppo", f"{w}/round1/ppo", f"{w}/round2/rm", "SFT", f"{w}/round2/ppo"),
        ("label", f"{w}/round2/ppo", f"{w}/round3/ranks.jsonl"),
        ("reward", f"{w}/round2/ppo", f"{w}/round3/ranks.jsonl", f"{w}/round3/rm"),
        ("ppo", f"{w}/round2/ppo", f"{w}/round3/rm", "SFT", out),
    ]


def test_judge_reward_scores_answers_by_the_builtin_judge(tok):
    """--reward judge: each rollout answer gets label.judge_score against its own prompt's example, centred on the
    first batch's mean; --prompts files (no examples) are refused."""
    from chatstack.stages.label import judge_score, task_prompts

    pool = [(tok.render_prompt(m), ex) for m, ex in task_prompts(6, "train", 0, ["add", "reverse"])]
    judge = ppo_mod.JudgeReward(tok, pool)
    answers = [pool[0][1].final, "12x", pool[2][1].final + "\n9", "nonsense words", pool[4][1].answer, "1"]
    rows = [p + tok.encode(a) + [tok.im_end_id] for (p, _), a in zip(pool, answers)]
    idx, lengths = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long), torch.tensor(list(map(len, rows)))
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
    starts = torch.tensor([len(p) for p, _ in pool])
    expect = torch.tensor([judge_score(a, ex) for a, (_, ex) in zip(answers, pool)])
    assert expect.max() == 2.0 and expect.min() < 1.0  # both right and wrong answers are in the batch
    got = judge(idx, lengths, starts)
    assert torch.allclose(got, expect - expect.mean())
    assert torch.allclose(judge(idx, lengths, starts), got)  # the centre is fixed after the first batch
    with pytest.raises(ValueError, match="--prompts"):
        ppo_mod.JudgeReward(tok, [(pool[0][0], None)])


def test_ppo_command_with_the_judge_reward_resumes_exactly(nano_run):
    from chatstack.cli import main

    sft, _, tmp = nano_run
    common = [
        "ppo",
        "--policy",
        str(sft),
        "--reward",
        "judge",
        "--rollout-batch",
        "8",
        "--minibatch",
        "4",
        "--max-new-tokens",
        "5",
        "--eval-n",
        "1",
        "--eval-every",
        "0",
        "--save-every",
        "2",
        "--time-budget",
        "0",
        "--no-progress",
        "--lr",
        "1e-3",
        "--tasks",
        "add,compare",
    ]
    assert main(common + ["--out", str(tmp / "a"), "--iterations", "4"]) == 0
    assert main(common + ["--out", str(tmp / "b"), "--iterations", "2"]) == 0
    st = torch.load(tmp / "b" / "state" / "ppo.pt", weights_only=True)
    assert isinstance(st["judge_centre"], float)
    st["max_iters"] = 4
    torch.save(st, tmp / "b" / "state" / "ppo.pt")
    assert main(common + ["--out", str(tmp / "b"), "--iterations", "4", "--resume"]) == 0
    train_a = [r for r in _rows(tmp / "a") if not r.get("eval")]
    assert train_a == [r for r in _rows(tmp / "b") if not r.get("eval")]
    assert json.loads((tmp / "a" / "config.json").read_text())["reward_model"] == "judge"
    assert main(["ppo", "--policy", str(sft), "--reward", "judge", "--out", str(tmp / "c"), "--rounds", "2"]) != 0
