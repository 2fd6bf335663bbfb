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
    for d in ("tokenizer", "data", "base", "sft", "rm", "ppo"):
        assert (out / d).is_dir(), d
    for ck in ("base", "sft", "rm", "ppo"):
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
    assert set(rep["evals"]) == {"base", "sft", "ppo"}
    for stage in ("base", "sft", "ppo"):
        tasks = rep["evals"][stage]["tasks"]
        assert tasks and all(0.0 <= t["accuracy"] <= 1.0 and t["n"] > 0 for t in tasks.values())
    h = rep["headline"]
    assert h["bits_per_char"] > 0 and 0.0 <= h["rm_val_accuracy"] <= 1.0 and h["ppo_kl"] is not None
    assert rep["stages"]["pretrain"]["params"] > 0 and rep["stages"]["pretrain"]["flops"] > 0
    md = (out / "report.md").read_text()
    assert "## Headline" in md and "## Evals per stage" in md and "Smoke run" in md
    for png in rep["plots"].values():
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "chatstack chat" in stdout and "chatstack serve" in stdout


def test_second_invocation_skips_finished_stages(smoke_run):
    out, _ = smoke_run
    proc = subprocess.run(
        [sys.executable, "-m", "chatstack.cli", "speedrun", "--out", str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done already") == 10


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
    assert proc.stdout.count("done already") == 8
