"""The speedrun's smoke variant: every stage runs through the CLI, the report has the documented layout,
and a second invocation skips what is done. Ten subprocesses, about a minute on an idle 2-core machine and
several under load: marked slow, and .ci/run runs them after the fast suite."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "chatstack.cli", "speedrun", "--out", str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_runs_every_stage_and_writes_the_report(smoke_run):
    out, stdout = smoke_run
    for d in ("tokenizer", "data", "base", "sft", "rm", "rl"):
        assert (out / d).is_dir(), d
    for ck in ("base", "sft", "rm", "rl"):
        assert json.loads((out / ck / "config.json").read_text())["format"] == 1
    rep = json.loads((out / "report.json").read_text())
    for key in (
        "environment",
        "wall_time_s",
        "peak_flops",
        "headline",
        "targets",
        "stages",
        "evals",
        "plots",
        "samples",
    ):
        assert key in rep, key
    assert rep["smoke"] is True
    assert set(rep["evals"]) == {"base", "sft", "rl"}
    for stage in ("base", "sft", "rl"):
        tasks = rep["evals"][stage]["tasks"]
        assert tasks and all(0.0 <= t["accuracy"] <= 1.0 and t["n"] > 0 for t in tasks.values())
    h = rep["headline"]
    assert h["bits_per_char"] > 0 and 0.0 <= h["rm_val_accuracy"] <= 1.0 and h["rl_kl"] is not None
    assert rep["stages"]["pretrain"]["params"] > 0 and rep["stages"]["pretrain"]["flops"] > 0
    md = (out / "report.md").read_text()
    assert "## Headline" in md and "## Evals per stage" in md and "Smoke run" in md
    for png in rep["plots"].values():
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "chatstack chat" in stdout and "chatstack serve" in stdout
    # the report leads with the alignment result (paired interval, win rate) and states the work done
    a = rep["alignment"]
    assert a["samples"] == 8 and len(a["avg_at_k_delta_ci"]) == 2 and 0.0 <= a["win_rate"] <= 1.0
    assert md.index("## Alignment") < md.index("## Headline")
    for name in ("pretrain", "sft", "reward", "rl"):
        st = rep["stages"][name]
        assert st["planned"] > 0 and st["completed"] == st["planned"], (name, st)
    assert rep["warnings"] == [] and rep["expected_idle_wall_s"] > 0


def test_second_invocation_skips_finished_stages(smoke_run):
    out, _ = smoke_run
    proc = subprocess.run(
        [sys.executable, "-m", "chatstack.cli", "speedrun", "--out", str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done already") == 11


def test_interrupted_training_stage_resumes(smoke_run, tmp_path):
    """Mark pretraining unfinished: the next run continues it with --resume from its checkpoint."""
    import shutil

    out, _ = smoke_run
    run = tmp_path / "again"
    shutil.copytree(out, run)
    state = json.loads((run / "speedrun.json").read_text())
    for name in ("pretrain", "eval-base"):
        state["stages"][name]["done"] = False
    (run / "speedrun.json").write_text(json.dumps(state))
    proc = subprocess.run(
        [sys.executable, "-m", "chatstack.cli", "speedrun", "--out", str(run), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "pretrain   resuming" in proc.stdout and "--resume" in proc.stdout
    assert proc.stdout.count("done already") == 9


def test_stage_check_reports_cut_and_slow_stages(tmp_path):
    from chatstack.stages.speedrun import STAGES, Run, stage_check

    run = Run(tmp_path, smoke=False, scale="cpu", nproc=1)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model": {}, "train": {"max_steps": 2800}}))
    rows = [{"step": 10, "loss": 5.0}, {"step": 29, "loss": 4.0}, {"step": 29, "eval": True, "val_loss": 4.1}]
    (tmp_path / "base" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pretrain = next(s for s in STAGES if s.name == "pretrain")
    rec = stage_check(run, pretrain, wall=2000.0)
    assert (rec["planned"], rec["completed"]) == (2800, 29)
    assert len(rec["warnings"]) == 2
    assert "29 of 2,800 planned steps" in rec["warnings"][0] and "idle 2-core" in rec["warnings"][1]
    label = next(s for s in STAGES if s.name == "label")
    assert stage_check(run, label, wall=997.0)["warnings"][0].startswith("label took 997 s")
    assert stage_check(run, label, wall=50.0)["warnings"] == []
