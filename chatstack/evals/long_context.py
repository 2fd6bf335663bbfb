"""Passkey retrieval (needle in a haystack): can the model find a number hidden at a given depth of a long prompt?

    from chatstack.evals.long_context import passkey_prompt, evaluate_passkey
    ids, key = passkey_prompt(tok, n_tokens=2048, depth=0.5, key=68271)
    res = evaluate_passkey(model, tok, lengths=[1024, 2048], depths=[0.0, 0.5, 1.0], n=2)

The prompt (Mohtashami & Jaggi 2023, "Landmark attention"): a task line, filler sentences ("The grass is
green. The sky is blue. ...") repeated to the target length, the line "The pass key is K. Remember it. K is
the pass key." inserted at `depth` (0 = right after the task line, 1 = just before the question), and the
question "What is the pass key? The pass key is". The model continues greedily; the answer is right when
the first number in the continuation is K. With chat=True the text goes into a ChatML user turn and the
assistant turn is opened with "The pass key is". Keys are 5-digit numbers drawn from a seeded generator.

Prompts are prefilled in chunks (the engine's chunked prefill), so memory holds the keys/values of the whole
context but activations of one chunk only.
"""

from __future__ import annotations

import random
import re
import resource
import time
from typing import Optional, Sequence

from chatstack.infer.engine import Engine, SamplingParams

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8  # greedy tokens generated after the prompt


def _needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_prompt(tok, n_tokens: int, depth: float, key: int, chat: bool = False) -> list[int]:
    """Token ids of a passkey prompt about `n_tokens` long (within a filler sentence of it)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    per_filler = len(tok.encode(FILLER))
    fixed = len(tok.encode(TASK + _needle(key) + QUESTION)) + (12 if chat else 0)
    n_fill = max(1, (n_tokens - fixed) // per_filler)
    before = int(round(n_fill * depth))
    text = TASK + FILLER * before + _needle(key) + FILLER * (n_fill - before)
    if chat:
        return tok.render_prompt([{"role": "user", "content": text + "\nWhat is the pass key?"}]) + tok.encode(
            "The pass key is"
        )
    return tok.encode(text + QUESTION)


def first_number(text: str) -> Optional[int]:
    m = re.search(r"\d+", text.replace(",", ""))
    return int(m.group()) if m else None


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evaluate_passkey(
    model,
    tok,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n: int = 2,
    seed: int = 0,
    chat: bool = False,
    prefill_chunk: int = 512,
    log=lambda s: None,
) -> dict:
    """{"lengths": {L: {"accuracy", "n", "depths": {d: accuracy}, "prompt_tokens", "seconds"}}, "samples": [...]}."""
    rng = random.Random(seed)
    out: dict = {"lengths": {}, "samples": []}
    for L in lengths:
        engine = Engine(model, tok, max_batch_size=1, prefill_chunk=prefill_chunk)
        per_depth: dict = {}
        right = total = 0
        t0 = time.perf_counter()
        n_prompt = 0
        for d in depths:
            hits = 0
            for _ in range(n):
                key = rng.randrange(10000, 100000)
                ids = passkey_prompt(tok, L - ANSWER_TOKENS, d, key, chat)  # prompt + answer fit in L
                if len(ids) > model.config.block_size - ANSWER_TOKENS:  # only a tokenizer far off its estimate
                    ids = ids[-(model.config.block_size - ANSWER_TOKENS) :]
                n_prompt = max(n_prompt, len(ids))
                c = engine.generate([ids], SamplingParams(max_new_tokens=ANSWER_TOKENS, temperature=0))[0]
                ok = first_number(c.text) == key
                hits += ok
                out["samples"].append({"length": L, "depth": d, "key": key, "reply": c.text, "correct": ok})
            per_depth[str(d)] = hits / n
            right += hits
            total += n
            log(f"length {L} depth {d}: {hits}/{n}")
        out["lengths"][str(L)] = {
            "accuracy": right / total,
            "n": total,
            "depths": per_depth,
            "prompt_tokens": n_prompt,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out
