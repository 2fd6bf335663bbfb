"""`chatstack align-bench`: every alignment method from one SFT checkpoint, the same budget each, one table.

    chatstack align-bench --sft runs/x/sft --out runs/bench --budget 270
    chatstack align-bench --sft runs/x/sft --out runs/bench --budget 120 --methods rloo-judge,dpo --n 100

Methods (each a `chatstack` command, run as its own process exactly as a user would type it):
    ppo-rm      chatstack ppo --reward RM              (InstructGPT: learned reward model, value head, GAE)
    ppo-judge   chatstack ppo --reward judge           (the same with the built-in judge as the reward)
    rloo-judge  chatstack rl --algo rloo --reward judge
    rloo-rm     chatstack rl --algo rloo --reward RM
    grpo-judge  chatstack rl --algo grpo --reward judge
    dpo         chatstack dpo --data RANKINGS           (all C(K,2) pairs of the rankings)
    lmsi        chatstack self-improve                  (no labels: majority-vote paths)
The rankings and the reward model come from --rankings / --rm, or are made first (`chatstack label`,
`chatstack reward`; not counted in the methods' budgets). RL methods and DPO get `--time-budget BUDGET`;
self-improve gets a fixed amount of work sized for about that budget on a 2-core CPU (its wall time is
reported). Then every checkpoint, the SFT one included, is measured the same way: `chatstack eval --samples K`
(greedy, avg@K, maj@K, pass@K with 95% intervals, KL to the SFT model) and `chatstack compare` against the
SFT model judged by the built-in judge and by the reward model. Output: OUT/report.md, OUT/report.json and
OUT/reward_vs_kl.png. Re-running skips the methods and measurements already done.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from chatstack.args import CLIError
from chatstack.evals.sampled import compare_evals

METHODS = ("ppo-rm", "ppo-judge", "rloo-judge", "rloo-rm", "grpo-judge", "dpo", "lmsi")
DEFAULT_METHODS = "ppo-rm,ppo-judge,rloo-judge,rloo-rm,dpo,lmsi"


def method_argv(name: str, sft: str, out: str, budget: float, rm: str, ranks: str, seed: int) -> list[str]:
    tb = ["--time-budget", str(budget), "--seed", str(seed)]
    if name == "ppo-rm":
        return [
            "ppo",
            "--policy",
            sft,
            "--reward",
            rm,
            "--out",
            out,
            "--iterations",
            "100000",
            *tb,
            "--eval-every",
            "0",
        ]
    if name == "ppo-judge":
        return [
            "ppo",
            "--policy",
            sft,
            "--reward",
            "judge",
            "--out",
            out,
            "--iterations",
            "100000",
            *tb,
            "--eval-every",
            "0",
        ]
    if name in ("rloo-judge", "rloo-rm", "grpo-judge"):
        algo, reward = name.split("-")
        return [
            "rl",
            "--policy",
            sft,
            "--reward",
            "judge" if reward == "judge" else rm,
            "--algo",
            algo,
            "--out",
            out,
            "--iterations",
            "100000",
            *tb,
        ]
    if name == "dpo":
        return ["dpo", "--sft", sft, "--data", ranks, "--out", out, "--max-steps", "100000", *tb, "--device", "cpu"]
    if name == "lmsi":
        # work sized for a ~270 s budget on 2 idle cores: 1,000 questions x 8 paths, 2 epochs on what is kept
        scale = max(0.1, budget / 270)
        return [
            "self-improve",
            sft,
            "--out",
            out,
            "--paths",
            "8",
            "--rounds",
            "1",
            "--questions",
            str(max(50, int(1000 * scale))),
            "--seed",
            str(seed),
        ]
    raise ValueError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}")


def _run(argv: list[str], log) -> float:
    cmd = [sys.executable, "-m", "chatstack.cli", *argv]
    log(f"$ chatstack {' '.join(shlex.quote(a) for a in argv)}")
    t0 = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"`chatstack {argv[0]}` failed (exit {proc.returncode})")
    return time.time() - t0


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_bench(
    sft: str,
    out: Path,
    budget: float,
    methods: list[str],
    rm: str = "",
    ranks: str = "",
    n: int = 100,
    samples: int = 8,
    seed: int = 0,
    log=print,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "bench.json"
    state = _load(state_path) or {"methods": {}, "sft": sft, "budget": budget}
    save = lambda: state_path.write_text(json.dumps(state, indent=2))
    if not ranks:
        ranks = str(out / "rankings.jsonl")
        if not Path(ranks).exists():
            state["label_s"] = _run(
                ["label", sft, "--judge", "builtin", "--k", "8", "--prompts", "1200", "--out", ranks + ".tmp"], log
            )
            Path(ranks + ".tmp").replace(ranks)
    if not rm:
        rm = str(out / "rm")
        if not (Path(rm) / "config.json").exists():
            state["reward_s"] = _run(["reward", "--sft", sft, "--data", ranks, "--out", rm], log)
    save()
    for name in methods:
        rec = state["methods"].setdefault(name, {})
        mdir = out / name
        if not rec.get("done"):
            rec["wall_s"] = _run(method_argv(name, sft, str(mdir), budget, rm, ranks, seed), log)
            rec["done"] = True
            save()
    rows = {}
    for name, ckpt in [("sft", sft)] + [(m, str(out / m)) for m in methods]:
        ev = out / f"eval_{name}.json"
        if not ev.exists():
            _run(
                [
                    "eval",
                    ckpt,
                    "--samples",
                    str(samples),
                    "--n",
                    str(n),
                    "--reference",
                    sft,
                    "--seed",
                    str(seed),
                    "--no-progress",
                    "--out",
                    str(ev),
                ],
                log,
            )
        row = {"eval": _load(ev)}
        if name != "sft":
            for judge, tag in (("builtin", "judge"), (rm, "rm")):
                cp = out / f"compare_{name}_{tag}.json"
                if not cp.exists():
                    _run(
                        [
                            "compare",
                            ckpt,
                            sft,
                            "--judge",
                            judge,
                            "--n",
                            str(max(10, n // 2)),
                            "--samples",
                            "2",
                            "--seed",
                            str(seed),
                            "--no-progress",
                            "--out",
                            str(cp),
                        ],
                        log,
                    )
                row[f"win_{tag}"] = _load(cp)
        rows[name] = row
    rep = build_report(state, rows, out)
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    (out / "report.md").write_text(render(rep))
    return rep


def _deltas(ev: dict, sft: dict) -> dict:
    """Paired changes against the SFT model on the same questions (points, 95% interval)."""
    out = {}
    for m in ("avg_at_k", "accuracy"):
        try:
            d = compare_evals(ev, sft, m)
            out[f"{m}_delta"], out[f"{m}_delta_ci"] = d["diff_points"], d["ci_points"]
        except ValueError:
            out[f"{m}_delta"], out[f"{m}_delta_ci"] = None, None
    return out


def build_report(state: dict, rows: dict, out: Path) -> dict:
    table = []
    for name, r in rows.items():
        mean, ans = r["eval"].get("mean", {}), r["eval"].get("answers", {})
        greedy_by_task = {t: v.get("accuracy") for t, v in r["eval"].get("tasks", {}).items()}
        sft_tasks = rows["sft"]["eval"].get("tasks", {})
        worst = min(
            (100 * (greedy_by_task[t] - sft_tasks[t]["accuracy"]) for t in greedy_by_task if t in sft_tasks),
            default=0.0,
        )
        row = {
            "method": name,
            "wall_s": state["methods"].get(name, {}).get("wall_s"),
            **{m: mean.get(m) for m in ("accuracy", "avg_at_k", "maj_at_k", "pass_at_k")},
            **{f"{m}_ci": mean.get(f"{m}_ci") for m in ("accuracy", "avg_at_k")},
            **_deltas(r["eval"], rows["sft"]["eval"]),
            "worst_task_greedy_delta": round(worst, 2),
            "kl": ans.get("kl_to_reference"),
            "entropy": ans.get("entropy"),
            "length": ans.get("length"),
            "ended": ans.get("ended"),
        }
        for tag in ("judge", "rm"):
            w = r.get(f"win_{tag}") or {}
            row[f"win_{tag}"] = w.get("win_rate")
            row[f"win_{tag}_ci"] = [w.get("ci_low"), w.get("ci_high")] if w else None
        table.append(row)
    plot = _plot(out, table)
    return {
        "sft": state.get("sft"),
        "budget_s": state.get("budget"),
        "rows": table,
        "plot": plot,
        "label_s": state.get("label_s"),
        "reward_s": state.get("reward_s"),
    }


def _plot(out: Path, table: list[dict]) -> str | None:
    import matplotlib  # noqa: PLC0415 (plots only; slow to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (plots only; slow to import)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in table:
        if r["kl"] is None or r["avg_at_k"] is None:
            continue
        ax.scatter([r["kl"]], [100 * r["avg_at_k"]])
        ax.annotate(r["method"], (r["kl"], 100 * r["avg_at_k"]), fontsize=8)
    ax.set_xlabel("KL to the SFT model (nats per answer, held-out prompts)")
    ax.set_ylabel("avg@K (%, the judge's reward)")
    ax.set_title("Reward vs KL")
    fig.tight_layout()
    fig.savefig(out / "reward_vs_kl.png", dpi=110)
    plt.close(fig)
    return "reward_vs_kl.png"


def _f(v, pct=False, nd=1):
    if v is None:
        return "—"
    return f"{100 * v:.{nd}f}" if pct else f"{v:.{nd}f}"


def render(rep: dict) -> str:
    lines = [
        f"# Alignment bench: {rep['sft']}",
        "",
        f"Every method starts from the same SFT checkpoint with a {rep['budget_s']:.0f} s budget. Accuracies in %, "
        "held-out questions, 95% bootstrap intervals in brackets; win rates against the SFT model's answers "
        "(ties count 1/2) by the built-in judge and by the reward model; KL in nats per sampled answer.",
        "",
        "| method | greedy | avg@K | Δ avg@K (pts) | maj@K | pass@K | win (judge) | win (RM) | KL | worst task Δ greedy | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        ci = r.get("avg_at_k_ci") or [None, None]
        delta = (
            ""
            if r["avg_at_k_delta"] is None
            else (f"{r['avg_at_k_delta']:+.1f} [{r['avg_at_k_delta_ci'][0]:+.1f}, {r['avg_at_k_delta_ci'][1]:+.1f}]")
        )
        wj = r.get("win_judge_ci") or [None, None]
        lines.append(
            f"| {r['method']} | {_f(r['accuracy'], True)} | {_f(r['avg_at_k'], True)} [{_f(ci[0], True)}, {_f(ci[1], True)}] "
            f"| {delta} | {_f(r['maj_at_k'], True)} "
            f"| {_f(r['pass_at_k'], True)} | {_f(r['win_judge'], nd=3)} [{_f(wj[0], nd=3)}, {_f(wj[1], nd=3)}] "
            f"| {_f(r['win_rm'], nd=3)} | {_f(r['kl'], nd=2)} | {r['worst_task_greedy_delta']:+.1f} | {_f(r['wall_s'], nd=0)} |"
        )
    if rep.get("plot"):
        lines += ["", f"![reward vs KL]({rep['plot']})"]
    return "\n".join(lines) + "\n"


def _cmd(args) -> int:

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise CLIError(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if args.budget <= 0:
        raise CLIError(f"--budget must be > 0 seconds, got {args.budget}")
    if not (Path(args.sft) / "config.json").exists():
        raise CLIError(f"--sft {args.sft}: no checkpoint there (config.json missing)")
    try:
        rep = run_bench(
            args.sft, Path(args.out), args.budget, methods, args.rm, args.rankings, args.n, args.samples, args.seed
        )
    except RuntimeError as e:
        raise CLIError(f"{e}; fix it and re-run to continue") from e
    print(render(rep))
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "align-bench",
        help="every alignment method from one SFT checkpoint, same budget, one table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sft", required=True, help="the SFT checkpoint every method starts from")
    p.add_argument("--out", required=True, help="bench directory")
    p.add_argument("--budget", type=float, default=270.0, help="seconds per method (default 270)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--rm", default="", help="reward model (default: trained here from the rankings)")
    p.add_argument("--rankings", default="", help="rankings JSONL (default: labelled here by the built-in judge)")
    p.add_argument("--n", type=int, default=100, help="held-out questions per task for the evals")
    p.add_argument("--samples", type=int, default=8, help="K for avg@K / maj@K / pass@K")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)
