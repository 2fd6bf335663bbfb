"""Reward model (chatstack/rlhf/reward_model.py): K-wise loss vs brute force, final-token read-out, training."""

import itertools
import json
import math

import pytest
import torch

from chatstack.data.preferences import Comparison
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.rlhf.reward_model import RewardModel, collate, evaluate_groups, ranking_loss


@pytest.fixture(scope="module")
def tok():
    from chatstack.tokenizer import Tokenizer

    texts = ["What is 12 + 34? The answer is 46. Reverse the letters: c a t"] * 3
    return Tokenizer.train(texts, vocab_size=300, show_progress=False)


def test_ranking_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    Ks = [4, 2, 9, 3]
    scores = [torch.randn(k, generator=g, dtype=torch.float64) for k in Ks]
    # brute force: per prompt, average over all C(K,2) pairs (i ranked above j), then mean over prompts
    per_prompt = []
    for s in scores:
        terms = [
            -math.log(1 / (1 + math.exp(-(s[i] - s[j]).item()))) for i, j in itertools.combinations(range(len(s)), 2)
        ]
        per_prompt.append(sum(terms) / len(terms))
    expect = sum(per_prompt) / len(per_prompt)
    flat = torch.cat(scores)
    pw, pl, pg, base = [], [], [], 0
    for gi, k in enumerate(Ks):
        for i, j in itertools.combinations(range(k), 2):
            pw.append(base + i)
            pl.append(base + j)
            pg.append(gi)
        base += k
    loss, stats = ranking_loss(flat, torch.tensor(pw), torch.tensor(pl), torch.tensor(pg), len(Ks))
    assert math.isclose(loss.item(), expect, rel_tol=1e-10)
    # a prompt with K=9 (36 pairs) weighs the same as one with K=2 (1 pair): one batch element each
    assert 0.0 <= stats["accuracy"] <= 1.0


def test_reward_model_reads_final_token_and_ignores_padding():
    torch.manual_seed(0)
    rm = RewardModel(get_preset("nano"))
    idx = torch.randint(0, 512, (2, 10))
    lengths = torch.tensor([10, 6])
    s = rm(idx, lengths)
    # the same rows without padding give the same scores
    s0 = rm(idx[:1], torch.tensor([10]))
    s1 = rm(idx[1:, :6], torch.tensor([6]))
    assert torch.allclose(s, torch.cat([s0, s1]), atol=1e-5)
    idx2 = idx.clone()
    idx2[1, 6:] = 7  # change only padding
    assert torch.allclose(rm(idx2, lengths), s, atol=1e-6)


def test_from_lm_copies_trunk_without_output_layer():
    for preset in ("nano", "nano-llama"):
        torch.manual_seed(0)
        lm = GPT(get_preset(preset))
        rm = RewardModel.from_lm(lm)
        assert rm.gpt.lm_head is None
        idx = torch.randint(0, 512, (1, 8))
        assert torch.allclose(rm.gpt.hidden_states(idx), lm.hidden_states(idx))
        assert not any(k.startswith("gpt.lm_head") for k in rm.state_dict())


def test_likelihood_term_is_the_mean_log_prob_of_the_response():
    """With likelihood="mean" the score is head(h_last) + lik_scale * mean log p(response tokens): check the
    extra term against log-probs from a plain forward pass of the language model, padded rows included."""
    torch.manual_seed(0)
    lm = GPT(get_preset("nano"))
    for mode in ("mean", "sum"):
        rm = RewardModel.from_lm(lm, likelihood=mode)
        base = RewardModel.from_lm(lm)
        base.head.load_state_dict(rm.head.state_dict())
        idx = torch.randint(0, 512, (2, 12))
        lengths, starts = torch.tensor([12, 8]), torch.tensor([5, 3])
        with torch.no_grad():
            rm.lik_scale.fill_(0.7)
            got = rm(idx, lengths, starts) - base(idx, lengths)
            logp = torch.log_softmax(lm(idx), -1)
        for b in range(2):
            toks = [logp[b, t - 1, idx[b, t]].item() for t in range(int(starts[b]), int(lengths[b]))]
            lik = sum(toks) / (len(toks) if mode == "mean" else 1)
            assert abs(got[b].item() - 0.7 * lik) < 1e-4
        with pytest.raises(ValueError, match="starts"):
            rm(idx, lengths)


def test_reward_model_learns_a_ranking(tok):
    """A nano RM separates well-formed short answers from junk within a few dozen steps."""
    torch.manual_seed(0)
    groups = []
    for a in range(20):
        for b in range(3):
            q = [{"role": "user", "content": f"What is {a} + {b}?"}]
            groups.append(Comparison(q, [str(a + b), f"{a + b} cat cat", "cat"], [(0, 1), (0, 2), (1, 2)]))
    rm = RewardModel(get_preset("nano", vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    before = evaluate_groups(rm, groups, tok, 64)["val_accuracy"]
    for step in range(40):
        batch = collate(groups[(step * 8) % 60 : (step * 8) % 60 + 8], tok, 64)
        scores = rm(batch["idx"], batch["lengths"])
        loss, _ = ranking_loss(scores, batch["pair_w"], batch["pair_l"], batch["pair_group"], int(batch["n_groups"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_groups(rm, groups, tok, 64)
    assert after["val_accuracy"] > 0.95 and after["val_accuracy"] > before
    assert after["val_margin"] > 0


def test_collate_layout(tok):
    g = [
        Comparison([{"role": "user", "content": "q"}], ["a", "bb", "c"], [(0, 1), (0, 2), (1, 2)]),
        Comparison([{"role": "user", "content": "r"}], ["x", "y"], [(1, 0)]),
    ]
    b = collate(g, tok, 64)
    assert b["idx"].shape[0] == 5 and int(b["n_groups"]) == 2
    assert b["pair_w"].tolist() == [0, 0, 1, 4] and b["pair_l"].tolist() == [1, 2, 2, 3]
    assert b["pair_group"].tolist() == [0, 0, 0, 1]
    # every row ends in <|im_end|>
    for row, n in zip(b["idx"], b["lengths"]):
        assert row[n - 1].item() == tok.im_end_id


@pytest.mark.parametrize("likelihood", ["mean", "none"])
def test_reward_command_checkpoint_round_trip(nano_ckpt, tmp_path, likelihood):
    """`chatstack reward` writes a checkpoint that loads back into the same scorer (likelihood term included),
    centred on the training answers, with its held-out accuracy recorded."""
    from chatstack.checkpoint import load_checkpoint
    from chatstack.data.preferences import load_preferences, split_by_prompt
    from chatstack.rlhf.reward_model import load_reward_model, mean_score
    from chatstack.stages.reward import RewardConfig, train_reward

    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for a in range(24):
            f.write(json.dumps({"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": f"{a} cat"}) + "\n")
    out = tmp_path / "rm"
    res = train_reward(
        RewardConfig(
            sft=str(nano_ckpt),
            data=[str(data)],
            out=str(out),
            likelihood=likelihood,
            max_steps=4,
            eval_every=0,
            time_budget=0,
            warmup_steps=1,
            batch_size=4,
        )
    )
    rm, cfg = load_reward_model(out)
    assert cfg["likelihood"] == likelihood and (rm.gpt.lm_head is None) == (likelihood == "none")
    tok = load_checkpoint(nano_ckpt).tokenizer
    train_g, val_g = split_by_prompt(load_preferences([str(data)]), 0.15, 1337)
    again = evaluate_groups(rm, val_g, tok, rm.config.block_size)
    assert again["val_accuracy"] == pytest.approx(res["val_accuracy"])
    assert abs(mean_score(rm, train_g, tok, rm.config.block_size)) < 1e-4  # centred on the reference answers
