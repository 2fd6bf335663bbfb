"""`chatstack recipe smollm2`: its stages are real CLI commands, run in order, resumed, never re-run when done.

    python3 -m pytest -q tests/test_recipe.py

The stages themselves are tested where they live (import/export: test_gguf*.py; LoRA sft/reward/ppo:
test_finetune.py); here the subprocesses are replaced by a recorder that writes each stage's output.
"""

import subprocess
from pathlib import Path

import pytest

from chatstack.cli import build_parser, main
from chatstack.stages import speedrun
from chatstack.stages.recipe import RECIPE_STAGES


@pytest.mark.parametrize("smoke", [False, True])
def test_every_stage_is_a_valid_command(smoke):
    parser = build_parser()
    run = speedrun.Run(Path("runs/x"), smoke, "cpu", 1)
    names = [s.name for s in RECIPE_STAGES["smollm2"]]
    assert names == ["import", "eval-base", "sft", "eval-sft", "label", "reward", "ppo", "eval-ppo", "export"]
    for s in RECIPE_STAGES["smollm2"]:
        args = parser.parse_args(s.argv(run))  # argparse exits on an unknown flag
        if s.name in ("sft", "reward", "ppo"):
            assert args.lora_rank == 16
        if s.name in ("sft", "reward"):
            assert args.seq_len == 256


def test_print_lists_the_commands(capsys):
    assert main(["recipe", "smollm2", "--out", "runs/r", "--print"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "chatstack import gguf --out runs/r/base" and len(lines) == 9
    assert lines[-1].startswith("chatstack export gguf runs/r/ppo")


def test_resumes_an_interrupted_stage_and_skips_finished_ones(tmp_path, monkeypatch):
    calls = []
    fail_at = {"reward"}

    def fake_run(cmd):
        argv = cmd[cmd.index("chatstack.cli") + 1 :]
        calls.append(argv)
        stage = next(s for s in RECIPE_STAGES["smollm2"] if s.argv(run)[:2] == argv[:2])
        out = tmp_path / stage.output
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")  # a training stage's checkpoint appears before it can fail
        if stage.name in fail_at:
            fail_at.discard(stage.name)
            return subprocess.CompletedProcess(cmd, 1)
        return subprocess.CompletedProcess(cmd, 0)

    run = speedrun.Run(tmp_path, False, "cpu", 1)
    monkeypatch.setattr(speedrun.subprocess, "run", fake_run)
    stages = RECIPE_STAGES["smollm2"]
    with pytest.raises(SystemExit, match="recipe smollm2 --out"):
        speedrun.run_pipeline(tmp_path, stages=stages, command="recipe smollm2")
    assert [c[0] for c in calls] == ["import", "eval", "sft", "eval", "label", "reward"]
    calls.clear()
    state = speedrun.run_pipeline(tmp_path, stages=stages, command="recipe smollm2")
    assert calls[0][0] == "reward" and calls[0][-1] == "--resume"  # continued, not restarted
    assert [c[0] for c in calls] == ["reward", "ppo", "eval", "export"]
    assert all(v["done"] for v in state["stages"].values())
    calls.clear()
    speedrun.run_pipeline(tmp_path, stages=stages, command="recipe smollm2")
    assert calls == []
