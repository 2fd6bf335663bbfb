"""`chatstack self-improve`: Large Language Models Can Self-Improve (LMSI, Huang et al. 2022), without labels.

    chatstack self-improve runs/x/sft --paths 8 --rounds 1 --out runs/x/lmsi
    chatstack self-improve runs/x/sft --paths 16 --rounds 2 --min-agreement 0.6 --formats cot,direct --out runs/x/lmsi

One round:
  1. sample `--paths` answers per unlabelled question (built-in task prompts, train split: only the questions
     are read, never their answers) at several temperatures (`--temperatures`, cycled over the paths);
  2. majority vote over the extracted final answers (self-consistency, Wang et al. 2022); keep the question
     when the winning answer has at least `--min-agreement` of the votes (a confident vote is right far more
     often than one sample), with the paths that reach it;
  3. fine-tune on those conversations with the SFT stage (chatstack.train.sft, same loop, same packing) in the
     LMSI paper's formats: `cot` keeps each path as sampled (its chain of thought and answer), `direct` adds
     the answer alone ("Answer: X" for chain-of-thought tasks, X otherwise).
Round r > 1 starts from round r-1's model. The built-in judge is never consulted; it only evaluates
(`chatstack eval`). Intermediate rounds and the self-generated data live in OUT.rounds/.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.data.tasks import TASKS, extract_final
from chatstack.evals.metrics import majority
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.stages.label import task_prompts
from chatstack.stages.sft import SFTConfig, run_sft


@dataclass
class SelfImproveConfig:
    paths: int = field(default=8, metadata={"help": "answers sampled per question"})
    rounds: int = field(default=1, metadata={"help": "sample -> vote -> fine-tune rounds"})
    questions: int = field(default=2000, metadata={"help": "unlabelled questions per round"})
    tasks: str = field(default="", metadata={"help": "comma-separated built-in tasks (default: all)"})
    temperatures: str = field(default="0.7,1.0", metadata={"help": "sampling temperatures, cycled over the paths"})
    min_agreement: float = field(
        default=0.5, metadata={"help": "keep a question when the majority answer has at least this share of the votes"}
    )
    max_paths_kept: int = field(
        default=1, metadata={"help": "distinct majority paths kept per question (the most frequent first)"}
    )
    formats: str = field(
        default="cot",
        metadata={"help": "training formats: cot (paths as sampled), direct (answer only); comma-separated"},
    )
    max_new_tokens: int = field(default=48, metadata={"help": "answer length cap"})
    epochs: float = field(default=2.0, metadata={"help": "fine-tuning passes over the self-generated data per round"})
    steps: int = field(
        default=0, metadata={"help": "fine-tuning steps per round instead of --epochs (0 = use --epochs)"}
    )
    # near the end of SFT's own schedule: a restarted Adam at 5e-4 moved every weight enough to lose 9-43 points
    # of add3 greedy accuracy on data that was 87-96% right (docs/rlhf.md)
    lr: float = field(default=1e-4, metadata={"help": "fine-tuning learning rate"})
    batch_size: int = field(default=16, metadata={"help": "fine-tuning rows per step"})
    seed: int = field(default=0, metadata={"help": "seed for questions, sampling and fine-tuning"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | ..."})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


def vote(finals: list[str]) -> tuple[str, float]:
    """(majority answer, its share of the votes); ties go to the answer seen first."""
    top = majority(finals)
    return top, Counter(finals)[top] / len(finals)


def self_generate(ckpt: str, cfg: SelfImproveConfig, round_seed: int) -> tuple[list[dict], dict]:
    """Conversations built from confident majority votes, and statistics (how often the votes were right is
    measured with the judge for the report only; nothing here trains on it)."""

    temps = [float(t) for t in cfg.temperatures.split(",") if t.strip()]
    if not temps or any(t <= 0 for t in temps):
        raise ValueError(f"--temperatures: need positive temperatures, got {cfg.temperatures!r}")
    formats = [f.strip() for f in cfg.formats.split(",") if f.strip()]
    if not formats or set(formats) - {"cot", "direct"}:
        raise ValueError(f"--formats: choose from cot, direct; got {cfg.formats!r}")
    ck = load_checkpoint(ckpt, device=cfg.device)
    if ck.config.get("kind", "lm") != "lm" or ck.tokenizer is None:
        raise ValueError(f"{ckpt}: self-improve needs a chat language-model checkpoint with its tokenizer")
    tok = ck.tokenizer
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or None
    items = task_prompts(cfg.questions, "train", round_seed, names)
    engine = Engine(ck.model.eval(), tok, max_batch_size=128)
    ids, params = [], []
    for qi, (msgs, _) in enumerate(items):
        p = tok.render_prompt(msgs)
        for s in range(cfg.paths):
            ids.append(p)
            params.append(
                SamplingParams(
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=temps[s % len(temps)],
                    seed=(round_seed * 1_000_003 + qi) * 1_009 + s,
                )
            )
    outs = engine.generate(ids, params, progress=cfg.progress)
    convs, kept, right = [], 0, 0
    for qi, (msgs, ex) in enumerate(items):
        texts = [c.text.strip() for c in outs[qi * cfg.paths : (qi + 1) * cfg.paths] if c.finish_reason == "stop"]
        if not texts:
            continue
        finals = [extract_final(t) for t in texts]
        top, share = vote(finals)
        if share < cfg.min_agreement or not top:
            continue
        kept += 1
        right += top == ex.final  # bookkeeping for the report, never used for selection
        # the most frequent paths to the majority answer first: a rarer path to the same final often has a wrong
        # step (a deterministic chain of thought has one right path)
        paths = [t for t, _ in Counter(t for t, f in zip(texts, finals) if f == top).most_common(cfg.max_paths_kept)]
        if "cot" in formats:
            convs += [{"messages": msgs + [{"role": "assistant", "content": t}]} for t in paths]
        if "direct" in formats:
            direct = f"Answer: {top}" if TASKS[ex.task].cot else top
            if direct not in paths or "cot" not in formats:
                convs.append({"messages": msgs + [{"role": "assistant", "content": direct}]})
    stats = {
        "questions": len(items),
        "kept": kept,
        "conversations": len(convs),
        "vote_accuracy_by_judge": round(right / kept, 4) if kept else None,
    }
    return convs, stats


def self_improve(ckpt: str, out: str, cfg: SelfImproveConfig) -> dict:
    if cfg.paths < 2:
        raise ValueError(f"--paths: a majority vote needs at least 2 paths, got {cfg.paths}")
    if cfg.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {cfg.rounds}")
    work = Path(str(out).rstrip("/") + ".rounds")
    policy, log = ckpt, []
    for r in range(1, cfg.rounds + 1):
        rdir = work / f"round{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        convs, stats = self_generate(policy, cfg, cfg.seed + r)
        if not convs:
            raise ValueError(
                f"round {r}: no confident majority vote (--min-agreement {cfg.min_agreement}); nothing to learn"
            )
        data = rdir / "self_generated.jsonl"
        data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))
        target = out if r == cfg.rounds else str(rdir / "model")
        scfg = SFTConfig(
            base=policy,
            data=[str(data)],
            val_data=[str(data)],
            out=target,
            max_steps=max(cfg.steps, 1),
            epochs=0.0 if cfg.steps > 0 else cfg.epochs,
            lr=cfg.lr,
            min_lr=cfg.lr / 10,
            warmup_steps=2,
            batch_size=cfg.batch_size,
            time_budget=0.0,
            seed=cfg.seed + r,
            device=cfg.device,
            eval_every=0,
            progress=cfg.progress,
        )
        run_sft(scfg, stage="self-improve", extra={"self_improve": {**asdict(cfg), "round": r, **stats}})
        log.append({"round": r, **stats, "out": target})
        print(json.dumps(log[-1]))
        policy = target
    return {"out": str(out), "rounds": log}


def _cmd(args) -> int:

    cfg = dataclass_from_args(SelfImproveConfig, args)
    try:
        res = self_improve(args.ckpt, args.out, cfg)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(res, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "self-improve",
        help="LMSI: fine-tune on the model's own confident majority-vote answers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ckpt", help="the SFT checkpoint to improve")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    add_dataclass_args(p, SelfImproveConfig)
    p.set_defaults(func=_cmd)
