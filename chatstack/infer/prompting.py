"""Prompting helpers: few-shot prompts built from examples, and self-consistency over chain-of-thought paths.

Few-shot (Brown et al. 2020): show k solved examples, then the question; the model continues the pattern.
Chain of thought (Wei et al. 2022; "Let's think step by step", Kojima et al. 2022): the model writes its
reasoning before the answer. Self-consistency (Wang et al. 2022): sample N reasoning paths (temperature > 0,
optionally several temperatures), extract each path's final answer, and return the most common one with
its vote share (votes / N paths; a path without an extractable answer counts against the share).

    from chatstack.infer.prompting import few_shot_prompt, self_consistency
    prompt = few_shot_prompt([{"question": "2+2?", "answer": "2+2=4. #### 4"}], "3+5?")
    result = self_consistency(engine, tokenizer.encode(prompt), paths=8, temperatures=[0.5, 0.9])
    print(result.answer, result.share)

    chatstack generate CKPT --few-shot examples.jsonl --prompt "3+5?" --paths 8 --path-temperatures 0.5 0.9
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from chatstack.data.jsonl import iter_jsonl
from chatstack.infer.engine import Engine, SamplingParams

COT_TRIGGER = "Let's think step by step."

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
_PATTERNS = [  # a marker; the answer is what follows its last occurrence
    re.compile(r"####"),  # GSM8K style
    re.compile(r"\\boxed\{(?=[^{}]*\})"),  # LaTeX boxed answer
    re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE),  # "the (final) answer is / Answer:"
]


def normalize_answer(ans: str) -> str:
    """Canonical form for voting: trimmed, no trailing period, numbers without $ / commas / '.0'."""
    a = ans.strip().strip("*").strip()
    a = a.splitlines()[0].strip() if a else a
    a = re.sub(r"[.。!]+$", "", a).strip()
    m = re.fullmatch(_NUM, a)
    if m:
        a = a.replace("$", "").replace(",", "")
        if "." in a:
            a = a.rstrip("0").rstrip(".")
        if a in ("-0", ""):
            a = "0"
    return a


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a worked solution: '#### 42', '\\boxed{42}', 'the answer is 42' / 'Answer: 42'
    (the last such marker wins), else the last number in the text; None when there is none.
    After a marker a number is preferred ('The answer is $1,200 dollars.' -> '1200')."""
    for pat in _PATTERNS:
        hits = list(pat.finditer(text))
        if hits:
            tail = text[hits[-1].end() :].split("}")[0] if "boxed" in pat.pattern else text[hits[-1].end() :]
            tail = tail.strip()
            num = re.match(r"\s*(" + _NUM + r")", tail)
            if num:
                return normalize_answer(num.group(1))
            tail = normalize_answer(tail)
            if tail:
                return tail
    nums = re.findall(_NUM, text)
    return normalize_answer(nums[-1]) if nums else None


def majority_vote(answers: Sequence[Optional[str]]) -> tuple[Optional[str], float, dict[str, int]]:
    """(most common answer, its share of all paths, votes per answer). Ties go to the answer seen first;
    None answers (nothing extracted) get no vote but count in the denominator."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0.0, {}
    best, n = votes.most_common(1)[0]  # most_common keeps first-seen order among ties
    return best, n / len(answers), dict(votes)


def load_examples(path: str | Path) -> list[dict]:
    """Few-shot examples from JSONL: {"question", "answer"} (or {"input", "output"}) per line."""

    out = []
    for lineno, obj in iter_jsonl(path):
        q = obj.get("question", obj.get("input")) if isinstance(obj, dict) else None
        a = obj.get("answer", obj.get("output")) if isinstance(obj, dict) else None
        if not isinstance(q, str) or not isinstance(a, str):
            raise ValueError(
                f"{path}:{lineno}: expected an object with string fields "
                f"'question' and 'answer' (or 'input' and 'output')"
            )
        out.append({"question": q, "answer": a})
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def few_shot_prompt(
    examples: Sequence[dict],
    question: str,
    shots: int = 0,
    instruction: str = "",
    q_prefix: str = "Q: ",
    a_prefix: str = "A:",
    cot: bool = False,
) -> str:
    """A plain-text few-shot prompt:

        {instruction}\\n\\nQ: ex1\\nA: ans1\\n\\nQ: ex2\\nA: ans2\\n\\nQ: question\\nA:[ Let's think step by step.]

    shots > 0 uses the first `shots` examples; 0 uses them all (0 examples = zero-shot)."""
    chosen = list(examples[:shots] if shots else examples)
    parts = [instruction.strip()] if instruction.strip() else []
    for ex in chosen:
        parts.append(f"{q_prefix}{ex['question'].strip()}\n{a_prefix} {ex['answer'].strip()}")
    last = f"{q_prefix}{question.strip()}\n{a_prefix}"
    if cot:
        last += " " + COT_TRIGGER
    parts.append(last)
    return "\n\n".join(parts)


def few_shot_messages(
    examples: Sequence[dict], question: str, shots: int = 0, system: str = "", cot: bool = False
) -> list[dict]:
    """The chat-model form of a few-shot prompt: each example as a user turn and an assistant reply,
    then the question as the last user turn (render with tokenizer.render_prompt)."""
    msgs = [{"role": "system", "content": system}] if system else []
    for ex in examples[:shots] if shots else examples:
        msgs += [
            {"role": "user", "content": ex["question"].strip()},
            {"role": "assistant", "content": ex["answer"].strip()},
        ]
    msgs.append({"role": "user", "content": question.strip() + (" " + COT_TRIGGER if cot else "")})
    return msgs


@dataclass
class SelfConsistency:
    answer: Optional[str]  # the majority answer (None if no path had one)
    share: float  # its votes / number of paths
    votes: dict[str, int]
    paths: list[dict] = field(default_factory=list)  # {"temperature", "text", "answer"} per sampled path


def self_consistency(
    engine: Engine,
    prompt_ids: list[int],
    paths: int = 8,
    temperatures: Sequence[float] = (0.7,),
    max_new_tokens: int = 256,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    extract: Callable[[str], Optional[str]] = extract_answer,
) -> SelfConsistency:
    """Sample `paths` completions of one prompt (temperatures assigned round-robin, all in one batch),
    extract each final answer, majority-vote. With `seed`, path i uses seed + i (reproducible)."""

    if paths < 1:
        raise ValueError(f"paths must be >= 1, got {paths}")
    temps = list(temperatures) or [0.7]
    params = [
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temps[i % len(temps)],
            top_p=top_p,
            top_k=top_k,
            seed=None if seed is None else seed + i,
            stop=list(stop),
        )
        for i in range(paths)
    ]
    outs = engine.generate([prompt_ids] * paths, params)
    answers = [extract(c.text) for c in outs]
    best, share, votes = majority_vote(answers)
    return SelfConsistency(
        best,
        share,
        votes,
        [{"temperature": p.temperature, "text": c.text, "answer": a} for p, c, a in zip(params, outs, answers)],
    )
