"""`chatstack recipe smollm2`: its stages are real CLI commands, run in order, resumed, never re-run when done.

    python3 -m pytest -q tests/test_recipe.py

The stages themselves are tested where they live (import/export: test_gguf*.py; LoRA sft/reward/ppo/rl:
test_finetune.py); here the subprocesses are replaced by a recorder that writes each stage's output.
"""

from pathlib import Path

import pytest

from chatstack.cli import build_parser, main
from chatstack.stages import speedrun
from chatstack.stages.recipe import RECIPE_EXPECTED_IDLE_S, RECIPE_STAGES


@pytest.mark.parametrize("smoke", [False, True])
def test_every_stage_is_a_valid_command(smoke):
    parser = build_parser()
    run = speedrun.Run(Path("runs/x"), smoke, "cpu", 1)
    names = [s.name for s in RECIPE_STAGES["smollm2"]]
    assert names == [
        "import",
        "eval-base",
        "sft",
        "eval-sft",
        "label",
        "reward",
        "rl",
        "eval-rl",
        "compare",
        "export",
    ]
    for s in RECIPE_STAGES["smollm2"]:
        args = parser.parse_args(s.argv(run))  # argparse exits on an unknown flag
        if s.name in ("sft", "reward", "rl"):
            assert args.lora_rank == 16
        if s.name == "rl":
            assert (args.algo, args.reward) == ("rloo", "judge")
        if s.name in ("eval-sft", "eval-rl"):
            assert args.samples == 8  # avg@8, the alignment target's metric
        if s.name in ("sft", "reward"):
            assert args.seq_len == 256


def test_print_lists_the_commands(capsys):
    assert main(["recipe", "smollm2", "--out", "runs/r", "--print"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "chatstack import gguf --out runs/r/base" and len(lines) == 10
    assert lines[-1].startswith("chatstack export gguf runs/r/rl")


def test_slow_stage_warnings_use_the_recipes_own_idle_times(tmp_path):
    """A 135M model's 15-minute SFT is on time for the recipe, though 5x the speedrun's tiny-model SFT."""
    sft = next(s for s in RECIPE_STAGES["smollm2"] if s.name == "sft")
    recipe_run = speedrun.Run(tmp_path, False, "cpu", 1, expected=RECIPE_EXPECTED_IDLE_S)
    assert speedrun.stage_check(recipe_run, sft, wall=1000.0)["warnings"] == []
    slow = speedrun.stage_check(recipe_run, sft, wall=3 * RECIPE_EXPECTED_IDLE_S["sft"])["warnings"]
    assert len(slow) == 1 and slow[0].startswith("sft took")
    assert speedrun.stage_check(speedrun.Run(tmp_path, False, "cpu", 1), sft, wall=1000.0)["warnings"]


def test_resumes_an_interrupted_stage_and_skips_finished_ones(tmp_path, monkeypatch):
    calls = []
    fail_at = {"reward"}

    def fake_run(cmd):  # each stage's process: (exit code, peak RSS in GB)
        argv = cmd[cmd.index("chatstack.cli") + 1 :]
        calls.append(argv)
        stage = next(s for s in RECIPE_STAGES["smollm2"] if s.argv(run)[:2] == argv[:2])
        out = tmp_path / stage.output
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")  # a training stage's checkpoint appears before it can fail
        if stage.name in fail_at:
            fail_at.discard(stage.name)
            return 1, 0.5
        return 0, 1.5 if stage.name == "rl" else 0.25

    run = speedrun.Run(tmp_path, False, "cpu", 1)
    monkeypatch.setattr(speedrun, "_run_child", fake_run)
    stages = RECIPE_STAGES["smollm2"]
    with pytest.raises(SystemExit, match="recipe smollm2 --out"):
        speedrun.run_pipeline(tmp_path, stages=stages, command="recipe smollm2")
    assert [c[0] for c in calls] == ["import", "eval", "sft", "eval", "label", "reward"]
    calls.clear()
    state = speedrun.run_pipeline(tmp_path, stages=stages, command="recipe smollm2")
    assert calls[0][0] == "reward" and calls[0][-1] == "--resume"  # continued, not restarted
    assert [c[0] for c in calls] == ["reward", "rl", "eval", "compare", "export"]
    assert all(v["done"] for v in state["stages"].values())
    assert state["stages"]["rl"]["peak_rss_gb"] == 1.5 and state["stages"]["reward"]["peak_rss_gb"] == 0.5
    calls.clear()
    speedrun.run_pipeline(tmp_path, stages=stages, command="recipe smollm2")
    assert calls == []


def test_a_stages_peak_memory_is_its_own_process_ru_maxrss():
    """The runner reads each stage's peak RSS from the kernel (os.wait4), not by sampling. Linux carries the
    parent's resident size over the exec, so the figure is at least the runner's own (~0.3 GB with torch)."""
    import sys

    from chatstack.stages.speedrun import _run_child

    def touch(mb):  # a child that makes `mb` MB resident
        return [sys.executable, "-c", f"b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096])"]

    import resource

    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # this process's peak, in GB
    mb = int(floor * 1e9 / 2**20)
    rc, small = _run_child(touch(mb + 400))
    assert rc == 0 and floor + 0.35 < small < floor + 0.9
    rc, big = _run_child(touch(mb + 1000))
    assert rc == 0 and big - small > 0.5
    assert _run_child([sys.executable, "-c", "import sys; sys.exit(3)"])[0] == 3
