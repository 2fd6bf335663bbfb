"""Sampled evaluation and comparison (chatstack/evals/sampled.py, compare.py) and their commands:
`chatstack eval --samples`, `--data QA.jsonl`, `chatstack compare`; JSON contracts and bad input."""

import json

import pytest

from chatstack.evals.compare import compare_models
from chatstack.evals.sampled import evaluate_questions, qa_questions, task_questions


@pytest.fixture(scope="module")
def ckpt(nano_ckpt):
    from chatstack.checkpoint import load_checkpoint

    return nano_ckpt, load_checkpoint(nano_ckpt)


def test_sampled_metrics_are_consistent(ckpt):
    _, ck = ckpt
    qs = task_questions(["add", "count"], n=4, seed=0)
    res = evaluate_questions(
        ck.model, ck.tokenizer, qs, samples=3, temperature=1.0, max_new_tokens=6, seed=0, reference=ck.model, n_boot=100
    )
    for name in ("add", "count"):
        t = res["tasks"][name]
        assert t["n"] == 4 and t["k"] == 3
        # pass@K >= maj@K is not guaranteed per question, but avg@K <= pass@K always is
        assert 0.0 <= t["avg_at_k"] <= t["pass_at_k"] <= 1.0
        for m in ("accuracy", "avg_at_k", "maj_at_k", "pass_at_k"):
            lo, hi = t[f"{m}_ci"]
            assert lo <= t[m] <= hi
    assert res["answers"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)  # the model against itself
    again = evaluate_questions(
        ck.model, ck.tokenizer, qs, samples=3, temperature=1.0, max_new_tokens=6, seed=0, n_boot=100
    )
    assert again["tasks"] == res["tasks"]  # seeded: the same command gives the same numbers


def test_qa_file_is_checked_like_the_builtin_tasks(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text(
        json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "answer": "Answer: 4."})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "3+3?"}], "answer": "6", "task": "sums"})
        + "\n"
    )
    qs = qa_questions(str(p))
    assert [(q.task, q.final) for q in qs] == [("qa", "4"), ("sums", "6")]
    assert qs[0].check("2 plus 2. Answer: 4") and not qs[0].check("5")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: 'answer'"):
        qa_questions(str(bad))


def test_a_model_against_itself_wins_half(ckpt):
    _, ck = ckpt
    qs = task_questions(["add"], n=3, seed=0)
    res = compare_models(ck.model, ck.model, ck.tokenizer, qs, samples=2, max_new_tokens=5, n_boot=50)
    assert res["win_rate"] == 0.5 and res["ties"] == res["comparisons"] == 6


def test_eval_and_compare_commands_json_contract(ckpt, tmp_path, capsys):
    from chatstack.cli import main

    path, _ = ckpt
    assert (
        main(
            [
                "eval",
                str(path),
                "--samples",
                "2",
                "--temperature",
                "1",
                "--json",
                "--n",
                "2",
                "--task",
                "add",
                "count",
                "--no-progress",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for t in res["tasks"].values():
        assert {"accuracy", "avg_at_k", "maj_at_k", "pass_at_k", "n"} <= set(t)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"}], "answer": str(i + 1)}) + "\n"
            for i in range(3)
        )
    )
    assert (
        main(
            [
                "eval",
                str(path),
                "--data",
                str(qa),
                "--samples",
                "2",
                "--json",
                "--no-progress",
                "--out",
                str(tmp_path / "q.json"),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tasks"]["qa"]["n"] == 3 and "pass_at_k" in res["tasks"]["qa"]
    assert (
        main(
            [
                "compare",
                str(path),
                str(path),
                "--judge",
                "builtin",
                "--n",
                "2",
                "--samples",
                "2",
                "--json",
                "--task",
                "add",
                "--no-progress",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"win_rate", "ci_low", "ci_high", "n"} <= set(res) and res["win_rate"] == 0.5
    assert main(["compare", str(path), str(path), "--data", str(qa), "--samples", "1", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3


def test_wrong_checkpoint_kind_is_one_line(ckpt, tmp_path, capsys):
    from chatstack.checkpoint import save_checkpoint
    from chatstack.cli import main
    from chatstack.rlhf.reward_model import RewardModel

    path, ck = ckpt
    rm = RewardModel.from_lm(ck.model)
    save_checkpoint(
        tmp_path / "rm",
        rm,
        {"kind": "reward", "stage": "reward", "model": ck.model.config.to_dict(), "tokenizer": ck.tokenizer.info()},
        ck.tokenizer,
    )
    assert main(["eval", str(tmp_path / "rm"), "--samples", "2", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "reward" in err and len(err.splitlines()) == 1
    assert main(["compare", str(tmp_path / "rm"), str(path), "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "A " in err and len(err.splitlines()) == 1


def test_paired_difference_against_a_baseline_eval(ckpt, tmp_path, capsys):
    from chatstack.cli import main
    from chatstack.evals.sampled import compare_evals

    path, _ = ckpt
    args = ["eval", str(path), "--samples", "2", "--n", "3", "--task", "add", "--no-progress", "--json"]
    assert main(args + ["--out", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "b.json"), "--baseline", str(tmp_path / "a.json")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    d = res["vs_baseline"]["avg_at_k"]
    assert d["diff_points"] == 0.0 and d["ci_points"] == [0.0, 0.0]  # the same model, the same seeds
    a = {"scores": {"avg_at_k": {"t": [1.0, 0.0, 1.0, 1.0]}}}
    b = {"scores": {"avg_at_k": {"t": [0.0, 0.0, 1.0, 0.0]}}}
    d = compare_evals(a, b, "avg_at_k", n_boot=500)
    assert d["diff_points"] == 50.0 and d["ci_points"][0] <= 50.0 <= d["ci_points"][1]
    with pytest.raises(ValueError, match="share no questions"):
        compare_evals(a, {"scores": {}}, "avg_at_k")


def test_align_bench_and_self_improve_bad_input_is_one_line(ckpt, tmp_path, capsys):
    from chatstack.cli import main

    path, _ = ckpt
    for argv, flag in (
        (
            ["align-bench", "--sft", str(path), "--out", str(tmp_path / "b"), "--methods", "rloo-judge,magic"],
            "--methods",
        ),
        (["align-bench", "--sft", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], "--sft"),
        (["self-improve", str(path), "--paths", "1", "--out", str(tmp_path / "s")], "--paths"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert flag in err and len(err.splitlines()) == 1


def test_align_bench_table_from_evals(tmp_path):
    from chatstack.stages.align_bench import build_report, render

    def ev(avg, acc):
        return {
            "mean": {"accuracy": sum(acc) / 4, "avg_at_k": sum(avg) / 4, "maj_at_k": 0.5, "pass_at_k": 0.9},
            "tasks": {"add": {"accuracy": sum(acc) / 4}},
            "scores": {"avg_at_k": {"add": avg}, "accuracy": {"add": acc}},
            "answers": {"kl_to_reference": 1.5, "entropy": 0.2, "length": 9.0, "ended": 1.0},
        }

    rows = {
        "sft": {"eval": ev([0.25, 0.5, 0.0, 0.25], [1.0, 0.0, 0.0, 1.0])},
        "rloo-judge": {
            "eval": ev([0.5, 0.75, 0.25, 0.5], [1.0, 0.0, 1.0, 1.0]),
            "win_judge": {"win_rate": 0.6, "ci_low": 0.5, "ci_high": 0.7},
        },
    }
    rep = build_report({"methods": {"rloo-judge": {"wall_s": 270.0}}, "sft": "SFT", "budget": 270}, rows, tmp_path)
    r = rep["rows"][1]
    assert r["avg_at_k_delta"] == 25.0 and r["avg_at_k_delta_ci"] == [25.0, 25.0]  # +0.25 on every question
    assert r["accuracy_delta"] == 25.0 and r["worst_task_greedy_delta"] == 25.0 and r["win_judge"] == 0.6
    md = render(rep)
    assert "| rloo-judge |" in md and "+25.0 [+25.0, +25.0]" in md
    assert (tmp_path / "reward_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
