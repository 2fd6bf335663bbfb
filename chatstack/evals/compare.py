"""Head-to-head comparison of two checkpoints: the win rate of A's sampled answers against B's (InstructGPT's
headline metric), judged by the built-in judge or by a reward model.

    from chatstack.evals.compare import compare_models
    res = compare_models(model_a, model_b, tok, questions, samples=2, judge="builtin")
    res["win_rate"], res["ci_low"], res["ci_high"]

For every held-out question both models sample `samples` answers with the same seeds; answer i of A meets
answer i of B. A win counts 1, a tie 1/2, a loss 0; the win rate is the mean over questions of each question's
mean, with a bootstrap interval over questions. The built-in judge scores an answer 2 / 1 / 0 / -1 (correct
and well-formed ... wrong and malformed; a QA file's question: 1 right, 0 wrong), so equal classes tie; a
reward model's scores almost never tie. Judging the same answers both ways shows reward over-optimisation: a
policy trained against a reward model wins by its judge more often than by the built-in one.
"""

from __future__ import annotations

import torch

from chatstack.evals.metrics import win_rate, win_scores
from chatstack.evals.sampled import Question, generate_answers
from chatstack.infer.engine import Engine
from chatstack.rlhf.rollout import build_rows


@torch.no_grad()
def rm_scores(rm, tok, questions: list[Question], sampled, batch: int = 64) -> list[list[float]]:
    """Reward-model score of every sampled answer: [[score per sample] per question]."""
    rows = [(tok.render_prompt(q.messages), list(c.token_ids)) for q, cs in zip(questions, sampled) for c in cs]
    dev = next(rm.parameters()).device
    flat: list[float] = []
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        idx, plen, resp, mask = build_rows([p for p, _ in chunk], [r for _, r in chunk], tok.eot_id)
        lengths = (plen + mask.sum(1).long()).clamp_min(1)
        flat += rm(idx.to(dev), lengths.to(dev), plen.to(dev)).float().tolist()
    out, j = [], 0
    for cs in sampled:
        out.append(flat[j : j + len(cs)])
        j += len(cs)
    return out


def judge_scores(questions: list[Question], sampled) -> list[list[float]]:
    return [[q.judge_score(c.text.strip()) for c in cs] for q, cs in zip(questions, sampled)]


def compare_models(
    model_a,
    model_b,
    tok,
    questions: list[Question],
    samples: int = 2,
    temperature: float = 1.0,
    judge="builtin",
    max_new_tokens: int = 48,
    seed: int = 0,
    n_boot: int = 2000,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Win rate of A over B. `judge`: "builtin" or a reward model (a module rm(idx, lengths, starts) -> (B,))."""
    answers = []
    for m in (model_a, model_b):
        was = m.training
        m.eval()
        eng = Engine(m, tok, max_batch_size=batch_size)
        answers.append(
            generate_answers(eng, tok, questions, samples, temperature, max_new_tokens, seed, progress, greedy=False)[1]
        )
        m.train(was)
    res: dict = {}
    judges = {"builtin": judge_scores}
    if judge != "builtin":
        judges = {"rm": lambda qs, sa: rm_scores(judge, tok, qs, sa, batch_size), "builtin": judge_scores}
    for name, fn in judges.items():
        sa, sb = fn(questions, answers[0]), fn(questions, answers[1])
        wr = win_rate([win_scores(x, y) for x, y in zip(sa, sb)], n_boot, seed)
        wr["mean_score_a"] = sum(map(sum, sa)) / sum(map(len, sa))
        wr["mean_score_b"] = sum(map(sum, sb)) / sum(map(len, sb))
        res[name] = wr
    head = res["rm" if judge != "builtin" else "builtin"]
    out = {
        **head,
        "judge": "builtin" if judge == "builtin" else "reward_model",
        "samples": samples,
        "temperature": temperature,
    }
    if judge != "builtin":
        out["builtin_judge"] = res["builtin"]
    return out
