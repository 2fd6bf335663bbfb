"""`chatstack dpo` (all C(K,2) pairs of each ranking, reference log-probs once, the shared loop) and
`chatstack self-improve` (majority-vote paths, no labels) on nano checkpoints; bad input is one line."""

import json

import pytest
import torch

from chatstack.stages import dpo as dpo_mod
from chatstack.stages.self_improve import vote


def _rankings(path, n=12):
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
                "responses": [str(i + 1), f"{i + 2}", "cat"],
                "scores": [2, 0, 0],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_come_from_every_ranking_without_ties(nano_ckpt, tmp_path):
    from chatstack.checkpoint import load_checkpoint
    from chatstack.data.preferences import load_preferences

    ck = load_checkpoint(nano_ckpt)
    f = tmp_path / "r.jsonl"
    f.write_text(
        json.dumps({"prompt": "hi", "responses": ["a", "b", "c", "d"]})
        + "\n"
        + json.dumps({"prompt": "yo", "responses": ["a", "b", "c"], "scores": [1, 1, 0]})
        + "\n"
    )
    rows, pairs = dpo_mod.pair_rows(load_preferences(str(f)), ck.tokenizer, ck.model.config.block_size)
    assert len(rows) == 7 and len(pairs) == 6 + 2  # C(4,2) + the two untied pairs of the second
    assert all(rows[w][1][-1] == ck.tokenizer.im_end_id for w, _ in pairs)


def test_dpo_learns_the_preferred_answers(nano_ckpt, tmp_path):
    from chatstack.cli import main

    data = _rankings(tmp_path / "ranks.jsonl")
    assert (
        main(
            [
                "dpo",
                "--sft",
                str(nano_ckpt),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "dpo"),
                "--max-steps",
                "12",
                "--batch-size",
                "8",
                "--lr",
                "3e-3",
                "--warmup-steps",
                "1",
                "--val-frac",
                "0",
                "--no-progress",
                "--beta",
                "0.5",
                "--nll-coef",
                "0",
            ]
        )
        == 0
    )
    conf = json.loads((tmp_path / "dpo" / "config.json").read_text())
    assert conf["stage"] == "dpo" and conf["data"]["pairs"] == 24
    rows = [json.loads(l) for l in open(tmp_path / "dpo" / "metrics.jsonl")]
    acc = [r["reward_accuracy"] for r in rows if "reward_accuracy" in r]
    assert acc and acc[-1] > 0.8  # the policy now prefers the chosen answers over the reference


def test_dpo_bad_input_names_the_file_and_line(nano_ckpt, tmp_path, capsys):
    from chatstack.cli import main

    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "responses": ["only"]}) + "\n")
    assert main(["dpo", "--sft", str(nano_ckpt), "--data", str(f), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "one.jsonl:1" in err and "responses" in err and len(err.splitlines()) == 1


def test_majority_vote_share():
    assert vote(["4", "5", "4", "4"]) == ("4", 0.75)


def test_self_improve_runs_without_labels(nano_ckpt, tmp_path, capsys):
    from chatstack.cli import main

    out = tmp_path / "lmsi"
    rc = main(
        [
            "self-improve",
            str(nano_ckpt),
            "--paths",
            "3",
            "--rounds",
            "1",
            "--questions",
            "6",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
            "--min-agreement",
            "0.3",
            "--out",
            str(out),
            "--no-progress",
            "--tasks",
            "count",
        ]
    )
    if rc == 2:  # an untrained model may never agree with itself; the error then says so on one line
        assert "no confident majority" in capsys.readouterr().err
        return
    conf = json.loads((out / "config.json").read_text())
    assert conf["stage"] == "self-improve" and conf["self_improve"]["kept"] >= 1


def test_nll_term_adds_the_chosen_answers_per_token_nll(nano_ckpt, tmp_path):
    """RPO: loss = DPO + nll_coef * mean over pairs of -log pi(y_w) / |y_w| (checked against a direct computation)."""
    from chatstack.checkpoint import load_checkpoint
    from chatstack.data.preferences import load_preferences
    from chatstack.rlhf.group import dpo_loss, sequence_logprobs

    ck = load_checkpoint(nano_ckpt)
    tok, model = ck.tokenizer, ck.model
    rows, pairs = dpo_mod.pair_rows(load_preferences(str(_rankings(tmp_path / "r.jsonl", 4))), tok, 64)
    which = [w for w, _ in pairs] + [l for _, l in pairs]
    batch = dpo_mod.collate_rows(rows, which, tok.eot_id)
    lp = sequence_logprobs(model, batch["idx"], batch["plen"], batch["resp"], batch["mask"]).detach()
    batch["ref"] = lp + 0.1 * torch.arange(len(which))  # any reference
    P = len(pairs)
    plain, _ = dpo_loss(lp[:P], lp[P:], batch["ref"][:P], batch["ref"][P:], 0.2)
    nll = -(lp[:P] / batch["mask"][:P].sum(1)).mean()
    for coef in (0.0, 0.7):
        cfg = dpo_mod.DPOConfig(beta=0.2, nll_coef=coef)
        task = dpo_mod.DPOTask(rows, pairs, [], [], None, None, tok, cfg)
        loss, stats = task.loss(model, batch)
        assert loss.item() == pytest.approx((plain + coef * nll).item(), rel=1e-5)
        assert ("nll_chosen" in stats) == (coef > 0)
