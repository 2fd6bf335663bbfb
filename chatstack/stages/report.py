"""The run's report card: `report.md` + `report.json` + PNG plots, from the stage directories of a run.

    chatstack speedrun --out runs/speedrun    # on a finished run: skips every stage and rebuilds the report

Everything here reads what the stages wrote (config.json, metrics.jsonl, eval JSONs) — it never trains.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import torch

from chatstack.train.loop import resolve_dtype


# ---------------------------------------------------------------------------------------------- reading
def read_metrics(stage_dir: Path) -> list[dict]:
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill; the loop rewrites on resume
    return rows


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r.get(x, i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def last(rows: list[dict], key: str) -> Optional[float]:
    for r in reversed(rows):
        if isinstance(r.get(key), (int, float)):
            return r[key]
    return None


def rolling(ys: list, n: int = 10) -> list:
    """Trailing mean over up to n points (a readable line through a noisy per-iteration curve)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= n:
            acc -= ys[i - n]
        out.append(acc / min(i + 1, n))
    return out


def window_mean(rows: list[dict], key: str, n: int = 10, at: str = "first") -> Optional[float]:
    """Mean of `key` over the first (or last) n rows that have it: one PPO iteration is too noisy to quote."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    vals = vals[:n] if at == "first" else vals[-n:]
    return sum(vals) / len(vals)


# ---------------------------------------------------------------------------------------------- environment
def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
        # a run from a tree with uncommitted changes to the code says so: the commit alone is not what ran
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=5,
        ).stdout.strip()
        if commit and dirty:
            commit += "+changes"
    except Exception:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    train_dtype = str(resolve_dtype("auto", torch.device("cuda" if gpu else "cpu"))).replace("torch.", "")
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "train_dtype": train_dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measure_peak_flops(seconds: float = 1.0, n: int = 1024, dtype: Optional[torch.dtype] = None) -> float:
    """Achievable n x n matmul FLOP/s on this device (the MFU denominator), in `dtype`; by default the precision
    training uses here: bf16 on CUDA and on CPUs with AMX (where --dtype auto trains with bf16 matmuls), else fp32."""

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or resolve_dtype("auto", torch.device(dev))
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:  # warm up: AMX bf16 ran at 1/3 of its rate for the first ~1 s
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    # the best of short batches, not the mean: on a shared machine the peak is what an idle moment reaches
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------- plots
def plot(
    path: Path, title: str, curves: list[tuple[str, list, list]], xlabel: str = "step", ylabel: str = ""
) -> Optional[str]:
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    import matplotlib  # noqa: PLC0415 (plots only; slow to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (plots only; slow to import)

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    has_trend = any("mean" in c[0] for c in curves)
    for label, xs, ys in curves:
        trend = "mean" in label
        # with a trend line, the raw per-iteration curve is drawn faint behind it
        ax.plot(
            xs,
            ys,
            label=label,
            marker="o" if len(xs) < 30 else None,
            markersize=3,
            alpha=1.0 if trend or not has_trend else 0.4,
            linewidth=2.0 if trend else 1.2,
        )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def image_grid(path: Path, items: list[tuple], cols: int = 3) -> str:
    """A PNG grid of (image (3, H, W) in [0, 1], question, answer, expected) with the question over each image
    and the answer (green when it is the expected one, red with the expected one beside it) under it."""
    import matplotlib  # noqa: PLC0415 (plots only; slow to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (plots only; slow to import)

    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, question, answer, expected) in zip(axes.flat, items):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(question, fontsize=8, wrap=True)
        ok = answer.strip().lower().strip(".!?") == expected.strip().lower()
        shown = answer if len(answer) <= 16 else answer[:15] + "…"
        ax.text(
            0.5,
            -0.08,
            f"answer: {shown!r}" + ("" if ok else f" (expected {expected!r})"),
            fontsize=8,
            ha="center",
            va="top",
            transform=ax.transAxes,
            color="green" if ok else "red",
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------- rendering
def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{nd}f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(x) for x in r) + " |")
    return "\n".join(out)


# the speedrun's headline (a report may bring its own as rep["headline_rows"])
HEADLINE_ROWS = (
    ("bits_per_char", "base: held-out bits per character"),
    ("sft_lift_points", "SFT lift over base few-shot (points)"),
    ("rm_val_accuracy", "reward model held-out pairwise accuracy"),
    ("rl_avg8_lift_points", "RL avg@8 lift over SFT (points)"),
    ("rl_win_rate", "RL win rate over SFT (built-in judge)"),
    ("rl_greedy_lift_points", "RL greedy lift over SFT (points)"),
    ("rl_reward_first", "RL mean judge score, first iterations"),
    ("rl_reward_last", "RL mean judge score, last iterations (no overlap with the first)"),
    ("rl_kl", "RL mean KL to the reference, last iterations (nats per answer)"),
    ("rl_logit_scale", "RL learned logit scale e^s at the end (samples at T = 1 as the SFT model at T = e^-s)"),
)


def render_markdown(rep: dict) -> str:
    env = rep["environment"]
    lines = [f"# chatstack report: {rep['name']}", ""]
    if rep.get("smoke"):
        lines += ["> **Smoke run**: tiny settings that check the pipeline's plumbing; its numbers mean nothing.", ""]
    lines += [
        f"Total wall time **{rep['wall_time_s'] / 60:.1f} min**. "
        f"{env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads)"
        f"{', GPU ' + env['gpu'] if env.get('gpu') else ''}; torch {env['torch']}, Python {env['python']}, "
        f"commit {env.get('git_commit') or '–'}, {env['date']}. Measured peak matmul "
        f"{rep['peak_flops'] / 1e9:.0f} GFLOP/s{' (' + env['train_dtype'] + ')' if env.get('train_dtype') else ''} "
        f"(the MFU denominator).",
        "",
    ]
    a = rep.get("alignment") or {}
    if a.get("avg_at_k_delta") is not None:
        k = a.get("samples")
        lo, hi = a["avg_at_k_delta_ci"]
        glo, ghi = a.get("accuracy_delta_ci", [0.0, 0.0])
        win = a.get("win_rate")
        lines += [
            "## Alignment",
            "",
            f"RL ({a.get('method', 'PPO, built-in judge reward')}) against the SFT model on held-out questions ({a.get('n_per_task')} per "
            f"task, {k} samples each at temperature 1): **avg@{k} {100 * a['sft'].get('avg_at_k', 0):.1f}% -> "
            f"{100 * a['rl'].get('avg_at_k', 0):.1f}% ({a['avg_at_k_delta']:+.1f} points, paired 95% interval "
            f"[{lo:+.1f}, {hi:+.1f}])**; greedy {100 * a['sft'].get('accuracy', 0):.1f}% -> "
            f"{100 * a['rl'].get('accuracy', 0):.1f}% ({a.get('accuracy_delta', 0):+.1f} [{glo:+.1f}, {ghi:+.1f}]); "
            + (
                f"win rate of its answers over SFT's {win:.3f} [{a['win_ci'][0]:.3f}, {a['win_ci'][1]:.3f}] by the "
                "built-in judge (ties 1/2); "
                if win is not None
                else ""
            )
            + f"KL to SFT {_fmt(a.get('kl'))} nats per answer; worst task's greedy change "
            f"{_fmt(a.get('worst_task_greedy_delta'))} points.",
            "",
        ]
    if rep.get("warnings"):
        lines += ["## Warnings", "", *[f"- **{w}**" for w in rep["warnings"]], ""]
    lines += ["## Headline", ""]
    h = rep["headline"]
    targets = rep.get("targets", {})
    rows = []
    for key, label in rep.get("headline_rows") or HEADLINE_ROWS:
        t = targets.get(key, {})
        rows.append([label, h.get(key), t.get("goal", ""), t.get("met")])
    lines += [table(["what", "value", "goal", "met"], rows), ""]
    lines += ["## Evals per stage", ""]
    ev = rep["evals"]
    task_names = sorted({t for stage in ev.values() for t in stage.get("tasks", {})})
    rm_acc = rep.get("reward_model", {}).get("val_accuracy_by_task") or {}
    rm_n = rep.get("reward_model", {}).get("val_pairs_by_task") or {}
    header = ["task"] + list(ev) + (["RM pairwise acc. (pairs)"] if rm_acc else [])
    rows = [
        [t]
        + [ev[s].get("tasks", {}).get(t, {}).get("accuracy") for s in ev]
        + ([f"{_fmt(rm_acc[t])} ({rm_n.get(t, '–')})" if t in rm_acc else "–"] if rm_acc else [])
        for t in task_names
    ]
    rows.append(
        ["**mean accuracy**"]
        + [ev[s].get("mean_accuracy") for s in ev]
        + ([h.get("rm_val_accuracy")] if rm_acc else [])
    )
    lines += [
        "Held-out exact-match accuracy (greedy; base model few-shot, chat models zero-shot with the chat template)"
        + (
            "; the last column is the reward model's held-out pairwise accuracy on each task's rankings"
            if rm_acc
            else ""
        )
        + ".",
        "",
        table(header, rows),
        "",
    ]
    lines += ["## Stages", ""]
    rows = []
    for name, s in rep["stages"].items():
        rows.append(
            [
                name,
                f"{s['completed']:,} / {s['planned']:,}" if s.get("planned") else "",
                round(s["wall_s"]) if s.get("wall_s") is not None else None,
                s.get("expected_idle_s"),
                s.get("peak_rss_gb"),
                s.get("params"),
                s.get("tokens"),
                s.get("flops"),
                s.get("flops_per_s"),
                s.get("mfu"),
                s.get("key"),
            ]
        )
    header = [
        "stage",
        "steps done / planned",
        "wall s",
        "idle 2-core s",
        "peak RSS GB",
        "params",
        "tokens",
        "FLOPs",
        "FLOP/s",
        "MFU",
    ]
    lines += [
        f"Expected wall time on an idle 2-core CPU: ~{rep.get('expected_idle_wall_s', 0) / 60:.0f} min"
        + (
            f"; run with --time-budget {rep['time_budget']:.0f} s."
            if rep.get("time_budget")
            else "; the run is defined by its steps (no time budget)."
        ),
        "",
        table(header + ["key number"], rows),
        "",
    ]
    if rep.get("plots"):
        lines += ["## Curves", ""]
        for title, fname in rep["plots"].items():
            lines += [f"**{title}**", "", f"![{title}]({fname})", ""]
    for stage, convs in rep.get("samples", {}).items():
        if not convs:
            continue
        lines += [f"## Sample conversations: {stage}", ""]
        for c in convs:
            lines += [f"- **user**: {c['user']}", f"  **assistant**: {c['assistant']!s}".replace("\n", " "), ""]
    vis = rep.get("vision")
    if vis:
        ev = vis["eval"]
        abl = (ev.get("ablation_zero_images") or {}).get("tasks", {})
        lines += ["## Vision (held-out images)", ""]
        rows = [
            [t, v["accuracy"], v["n"], (ev.get("chance") or {}).get(t), abl.get(t, {}).get("accuracy")]
            for t, v in ev["tasks"].items()
        ]
        rows.append(
            [
                "scenes (mean)",
                ev.get("scenes_mean"),
                None,
                None,
                (ev.get("ablation_zero_images") or {}).get("scenes_mean"),
            ]
        )
        lines += [table(["task", "accuracy", "n", "chance", "image tokens zeroed"], rows), ""]
        if vis.get("grid"):
            lines += [f"![held-out images and answers]({vis['grid']})", ""]
    lines += ["## Notes", "", *[f"- {n}" for n in rep.get("notes", [])], ""]
    return "\n".join(lines)


def write_report(out: Path, rep: dict) -> None:
    out = Path(out)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(rep, indent=2, default=str))
    tmp.replace(out / "report.json")
    tmp = out / "report.md.tmp"
    tmp.write_text(render_markdown(rep))
    tmp.replace(out / "report.md")
