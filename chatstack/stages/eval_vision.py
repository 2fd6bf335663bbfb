"""`chatstack eval-vision`: held-out accuracy of a CLIP checkpoint (zero-shot) or a vision chat model.

    chatstack eval-vision runs/clip --json                 # {"zero_shot_accuracy", "n", "interval", "per_class", ...}
    chatstack eval-vision runs/vision --json               # {"tasks": {NAME: {"accuracy", "n", "interval"}}, ...}
    chatstack eval-vision runs/vision --ablation --json    # also the same questions with the image tokens zeroed
    chatstack eval-vision runs/vision --tasks digits --n 100 --out eval.json

Tasks of a chat model: digits, scene-colour, scene-shape, scene-count, scene-position (chatstack.evals.vision).
Without --json a table is printed (per question type, with 95% Wilson intervals and chance levels).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from chatstack.args import CLIError
from chatstack.checkpoint import CheckpointError, load_checkpoint, read_config
from chatstack.evals.vision import chat_metrics, clip_metrics
from chatstack.infer.engine import Engine
from chatstack.vision.chat_data import AUX_TASKS, TASKS
from chatstack.vision.vlm import load_clip, load_vision

# answering without looking: 1 in 10 digits, 4 colours, 3 shapes, 3 counts, 2 sides, 3 bands; a description's best
# blind guess is one of the 12 one-shape captions, and a third of the scenes hold one shape
CHANCE = {
    "digits": 0.1,
    "scene-colour": 0.25,
    "scene-shape": 1 / 3,
    "scene-count": 1 / 3,
    "scene-position": 0.5,
    "scene-where": 1 / 3,
    "scene-describe": 1 / 36,
}


def evaluate(path: str, tasks: list[str], n: int = 0, ablation: bool = False) -> dict:
    cfg = read_config(path)
    t0 = time.perf_counter()
    if cfg.get("kind") == "clip":
        model, _ = load_clip(path)
        builtin = (cfg.get("data") or {}).get("builtin") or ["digits"]
        res = {"checkpoint": str(path), "kind": "clip", **clip_metrics(model, builtin)}
    else:
        if cfg.get("vision") is None:
            raise ValueError(f"{path}: a text-only checkpoint (no image encoder); train one with chatstack sft-vision")
        ck = load_checkpoint(path)
        adapter = load_vision(path)
        engine = Engine(ck.model.eval(), ck.tokenizer, max_batch_size=64)
        res = {
            "checkpoint": str(path),
            "kind": "vision-chat",
            "image_tokens": adapter.image_tokens,
            **chat_metrics(engine, adapter, tasks, n),
        }
        if ablation:
            z = chat_metrics(engine, adapter, tasks, n, zero_images=True)
            res["ablation_zero_images"] = {"tasks": z["tasks"], "scenes_mean": z.get("scenes_mean")}
        res["chance"] = {t: round(CHANCE[t], 4) for t in tasks}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def table(res: dict) -> str:
    if res.get("kind") == "clip":
        lines = [
            f"zero-shot accuracy {res['zero_shot_accuracy']:.3f} on {res['n']} held-out images "
            f"(95% CI {res.get('interval')})"
        ]
        if "scenes_zero_shot_accuracy" in res:
            lines.append(f"scenes (one shape, 12 colour x shape prompts): {res['scenes_zero_shot_accuracy']:.3f}")
        return "\n".join(lines)
    abl = (res.get("ablation_zero_images") or {}).get("tasks", {})
    head = f"{'task':16s} {'accuracy':>8s} {'95% CI':>15s} {'n':>5s} {'chance':>7s}" + (
        f" {'zeroed':>7s}" if abl else ""
    )
    lines = [head]
    for t, v in res["tasks"].items():
        ci = f"[{v['interval'][0]:.3f}, {v['interval'][1]:.3f}]"
        row = f"{t:16s} {v['accuracy']:8.3f} {ci:>15s} {v['n']:5d} {res['chance'][t]:7.3f}"
        if abl:
            row += f" {abl[t]['accuracy']:7.3f}"
        lines.append(row)
    if "scenes_mean" in res:
        lines.append(
            f"{'scenes (mean)':16s} {res['scenes_mean']:8.3f}"
            + (f" {'':>15s} {'':>5s} {'':>7s} {res['ablation_zero_images']['scenes_mean']:7.3f}" if abl else "")
        )
    return "\n".join(lines)


def _cmd(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS + AUX_TASKS]
    if bad or not tasks:
        raise CLIError(
            f"--tasks: unknown task {bad[0] if bad else args.tasks!r} (one of {', '.join(TASKS + AUX_TASKS)})"
        )
    if args.n < 0:
        raise CLIError(f"--n must be >= 0, got {args.n}")
    try:
        res = evaluate(args.checkpoint, tasks, args.n, args.ablation)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    sys.stdout.write((text if args.json else table(res)) + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval-vision",
        help="held-out accuracy of a CLIP or vision chat checkpoint",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("checkpoint", help="a clip-train or sft-vision checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"chat tasks (default: {','.join(TASKS)})")
    p.add_argument("--n", type=int, default=0, help="questions per task (0 = all 359 test digits, 100 per scene type)")
    p.add_argument("--ablation", action="store_true", help="also answer with every image token zeroed")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.set_defaults(func=_cmd)
