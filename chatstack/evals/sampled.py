"""Sampled-answer evaluation: greedy accuracy plus avg@K, maj@K and pass@K with bootstrap intervals.

    from chatstack.evals.sampled import task_questions, qa_questions, evaluate_questions
    qs = task_questions(["add", "count"], n=300, seed=0)          # held-out built-in questions
    qs = qa_questions("my_qa.jsonl")                               # {"messages": [...], "answer": "..."} per line
    res = evaluate_questions(model, tok, qs, samples=8, temperature=1.0)
    res["tasks"]["add"]["avg_at_k"], res["mean"]["avg_at_k_ci"]

A question is checked the way the built-in tasks check theirs (chatstack.data.tasks): the reply's final
answer, `extract_final(reply)` (the text after the last "Answer:" if any, whitespace collapsed, one trailing
"." dropped), must equal the reference exactly. For a QA file the reference is `extract_final(answer)`, so
"Answer: 12", "12." and "12" are the same reference. maj@K votes over the extracted finals.

Every sample has its own seed (seed, question, sample), so the same command gives the same numbers, and
two checkpoints are sampled with the same seeds. Per-answer statistics of the samples come too: mean length
in tokens, the share of answers that ended (stop token before the length cap) and, with a reference model,
the KL to it (k1, nats per answer) and the entropy (nats per token) at the sampling temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatstack.data.jsonl import iter_jsonl
from chatstack.data.tasks import TASKS, Example, extract_final, get_task
from chatstack.evals.metrics import paired_difference, question_metrics, stratified_bootstrap_ci
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.rlhf.rollout import build_rows, gather_response


@dataclass
class Question:
    task: str  # built-in task name, or the QA file's "task" field (default "qa")
    messages: list[dict]  # the prompt
    final: str  # reference final answer
    example: Example | None = None  # built-in tasks: the Example (its well-formedness pattern, the judge)

    def check(self, reply: str) -> bool:
        return extract_final(reply) == self.final

    def well_formed(self, reply: str) -> bool | None:
        return get_task(self.task).well_formed(reply) if self.example is not None else None

    def judge_score(self, reply: str) -> float:
        """The built-in judge's score (2 / 1 / 0 / -1, chatstack.data.label); a QA question: 1 right, 0 wrong."""
        if self.example is None:
            return float(self.check(reply))
        return 2.0 * self.check(reply) + 1.0 * bool(self.well_formed(reply)) - 1.0


def task_questions(names=None, n: int = 300, seed: int = 0, split: str = "test") -> list[Question]:
    names = list(names or TASKS)
    out = []
    for name in names:
        for ex in get_task(name).examples(split, n, seed):
            out.append(Question(name, ex.messages, ex.final, ex))
    return out


def qa_questions(path: str, n: int = 0) -> list[Question]:
    """Checkable questions from JSONL: {"messages": [... ending with the user's turn], "answer": str, "task"?}."""
    out = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object with 'messages' and 'answer'")
        msgs, ans = obj.get("messages"), obj.get("answer")
        if isinstance(obj.get("prompt"), str) and msgs is None:
            msgs = [{"role": "user", "content": obj["prompt"]}]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
        ):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        if msgs[-1]["role"] == "assistant":
            raise ValueError(f"{where}: 'messages' must end with the user's turn (the answer goes in 'answer')")
        if not isinstance(ans, (str, int, float)) or not str(ans).strip():
            raise ValueError(f"{where}: 'answer' must be a non-empty string")
        task = str(obj.get("task") or "qa")
        out.append(Question(task, msgs, extract_final(str(ans))))
        if n and len(out) >= n * 1000:
            break
    if not out:
        raise ValueError(f"{path}: no questions")
    if n:
        per: dict[str, int] = {}
        kept = []
        for q in out:
            per[q.task] = per.get(q.task, 0) + 1
            if per[q.task] <= n:
                kept.append(q)
        out = kept
    return out


def sample_seed(seed: int, question: int, sample: int) -> int:
    return (seed * 1_000_003 + question) * 1_009 + sample


@torch.no_grad()
def generate_answers(
    engine: Engine,
    tok,
    questions: list[Question],
    samples: int,
    temperature: float,
    max_new_tokens: int = 48,
    seed: int = 0,
    progress: bool = False,
    greedy: bool = True,
):
    """(greedy completions or None, [K sampled completions per question]) through the engine."""
    prompts = [tok.render_prompt(q.messages) for q in questions]
    greedy_out = None
    if greedy:
        greedy_out = engine.generate(
            prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), progress=progress
        )
    sampled = [[] for _ in questions]
    if samples > 0:
        ids, params = [], []
        for i, p in enumerate(prompts):
            for s in range(samples):
                ids.append(p)
                params.append(
                    SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=sample_seed(seed, i, s))
                )
        outs = engine.generate(ids, params, progress=progress)
        for j, c in enumerate(outs):
            sampled[j // samples].append(c)
    return greedy_out, sampled


@torch.no_grad()
def answer_stats(model, ref, tok, questions: list[Question], sampled, temperature: float, batch: int = 64) -> dict:
    """Mean KL(model || ref) per answer (k1, at the sampling temperature), entropy per token, from the samples."""
    t = temperature if temperature > 0 else 1.0
    rows = [(tok.render_prompt(q.messages), list(c.token_ids)) for q, cs in zip(questions, sampled) for c in cs]
    dev = next(model.parameters()).device
    kl_sum = ent_sum = 0.0
    n_ans = n_tok = 0
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        idx, plen, resp, mask = build_rows([p for p, _ in chunk], [r for _, r in chunk], tok.eot_id)
        idx, plen, resp, mask = idx.to(dev), plen.to(dev), resp.to(dev), mask.to(dev)
        lp = F.log_softmax(model.lm_head(gather_response(model.hidden_states(idx), plen, resp.size(1))).float() / t, -1)
        ent_sum += float((-(lp.exp() * lp).sum(-1) * mask).sum())
        n_tok += int(mask.sum())
        n_ans += len(chunk)
        if ref is not None:
            lq = F.log_softmax(ref.lm_head(gather_response(ref.hidden_states(idx), plen, resp.size(1))).float() / t, -1)
            tk = resp.unsqueeze(-1)
            kl_sum += float(((lp.gather(-1, tk) - lq.gather(-1, tk)).squeeze(-1) * mask).sum())
    out = {"entropy": ent_sum / max(n_tok, 1)}
    if ref is not None:
        out["kl_to_reference"] = kl_sum / max(n_ans, 1)
    return out


def _summary(values_by_task: dict[str, list[float]], n_boot: int, seed: int) -> tuple[float, float, float]:
    groups = list(values_by_task.values())
    mean = sum(sum(g) / len(g) for g in groups) / len(groups)
    lo, hi = stratified_bootstrap_ci(groups, n_boot, seed)
    return mean, lo, hi


METRICS = ("accuracy", "avg_at_k", "maj_at_k", "pass_at_k")


def score_questions(questions: list[Question], greedy_out, sampled, samples: int, k: int | None = None) -> dict:
    """Per-question scores {metric: {task: [values]}} and per-task extras."""
    per: dict[str, dict[str, list[float]]] = {m: {} for m in METRICS}
    extra: dict[str, dict] = {}
    for i, q in enumerate(questions):
        e = extra.setdefault(q.task, {"well_formed": [], "length": [], "ended": [], "samples": []})
        if greedy_out is not None:
            reply = greedy_out[i].text.strip()
            ok = q.check(reply)
            per["accuracy"].setdefault(q.task, []).append(float(ok))
            wf = q.well_formed(reply)
            if wf is not None:
                e["well_formed"].append(float(wf))
            if len(e["samples"]) < 3:
                e["samples"].append(
                    {"prompt": q.messages[-1]["content"], "reply": reply, "expected": q.final, "correct": ok}
                )
        if samples:
            cs = sampled[i]
            texts = [c.text.strip() for c in cs]
            m = question_metrics([q.check(t) for t in texts], [extract_final(t) for t in texts], q.final, k)
            per["avg_at_k"].setdefault(q.task, []).append(m["avg"])
            per["maj_at_k"].setdefault(q.task, []).append(m["maj"])
            per["pass_at_k"].setdefault(q.task, []).append(m["pass"])
            e["length"] += [len(c.token_ids) for c in cs]
            e["ended"] += [float(c.finish_reason == "stop") for c in cs]
    return {"per": per, "extra": extra}


def summarise(scored: dict, samples: int, n_boot: int = 2000, seed: int = 0) -> dict:
    per, extra = scored["per"], scored["extra"]
    tasks: dict[str, dict] = {}
    mean: dict[str, float] = {}
    for metric in METRICS:
        if not per[metric]:
            continue
        for name, vals in per[metric].items():
            lo, hi = stratified_bootstrap_ci([vals], n_boot, seed)
            t = tasks.setdefault(name, {"n": len(vals)})
            t[metric] = round(sum(vals) / len(vals), 4)
            t[f"{metric}_ci"] = [round(lo, 4), round(hi, 4)]
        mu, lo, hi = _summary(per[metric], n_boot, seed)
        mean[metric] = round(mu, 4)
        mean[f"{metric}_ci"] = [round(lo, 4), round(hi, 4)]
    for name, e in extra.items():
        t = tasks.setdefault(name, {})
        if e["well_formed"]:
            t["well_formed"] = round(sum(e["well_formed"]) / len(e["well_formed"]), 4)
        if e["length"]:
            t["answer_length"] = round(sum(e["length"]) / len(e["length"]), 2)
            t["ended"] = round(sum(e["ended"]) / len(e["ended"]), 4)
        if samples:
            t["k"] = samples
        t["samples"] = e["samples"]
    # per-question scores, so two evaluations of the same questions can be compared pairwise later
    scores = {m: {name: [round(v, 4) for v in vals] for name, vals in per[m].items()} for m in METRICS if per[m]}
    return {"tasks": tasks, "mean": mean, "scores": scores}


def compare_evals(a: dict, b: dict, metric: str = "avg_at_k", n_boot: int = 2000, seed: int = 0) -> dict:
    """a - b on `metric` over the questions both evaluations share (same tasks, n and seed), in points, with a
    paired bootstrap 95% interval: the same questions are resampled for both models."""
    sa, sb = a.get("scores", {}).get(metric, {}), b.get("scores", {}).get(metric, {})
    names = [t for t in sa if t in sb and len(sa[t]) == len(sb[t])]
    if not names:
        raise ValueError(f"the two evaluations share no questions scored by {metric}")
    d = paired_difference([sa[t] for t in names], [sb[t] for t in names], n_boot, seed)
    return {
        "metric": metric,
        "diff_points": round(100 * d["diff"], 2),
        "ci_points": [round(100 * d["ci_low"], 2), round(100 * d["ci_high"], 2)],
        "tasks": names,
    }


def evaluate_questions(
    model,
    tok,
    questions: list[Question],
    samples: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    reference=None,
    n_boot: int = 2000,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """The whole evaluation of one model: {"tasks": {name: {...}}, "mean": {...}, "answers": {...}}."""
    was = model.training
    model.eval()
    engine = Engine(model, tok, max_batch_size=batch_size)
    greedy_out, sampled = generate_answers(engine, tok, questions, samples, temperature, max_new_tokens, seed, progress)
    res = summarise(score_questions(questions, greedy_out, sampled, samples), samples, n_boot, seed)
    if samples:
        flat = [c for cs in sampled for c in cs]
        res["answers"] = {
            "length": round(sum(len(c.token_ids) for c in flat) / len(flat), 2),
            "ended": round(sum(c.finish_reason == "stop" for c in flat) / len(flat), 4),
            **{
                k: round(v, 4)
                for k, v in answer_stats(model, reference, tok, questions, sampled, temperature, batch_size).items()
            },
        }
    model.train(was)
    return res
