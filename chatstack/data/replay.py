"""Self-distillation replay: a pretrained chat model's own replies to open questions, mixed into its SFT data.

Fine-tuning a chat model such as SmolLM2 on short task answers plus casual human chit-chat teaches it to answer
everything in a few words ("Any advice?" -> an echo of the question). Training on its own greedy replies to
open questions at the same time holds those answers in place while the adapters learn the tasks: the replies'
loss is already low, so they cost little to fit and pull the model back wherever the task data drags it away.

    chatstack sft --base runs/smol/base --mix tasks=1,identity=1,replay=1 --replay 300 ...

The questions are the user turns of the ChatterBot corpus's train split; `chatstack.stages.sft` generates the
replies with the base model before training and keeps them in OUT/replay.jsonl, so a resumed run trains on
exactly the same data.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable

from chatstack.data.chat_builtin import chatterbot

# a reply cut by the token limit keeps its complete sentences only
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def replay_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct open questions (ChatterBot's train split, shuffled by `seed`)."""
    seen, out = set(), []
    for conv in chatterbot("train"):
        q = conv[0]["content"].strip()
        if q and q.lower() not in seen:
            seen.add(q.lower())
            out.append(q)
    random.Random(f"replay|{seed}").shuffle(out)
    return out[:n]


def trim_reply(text: str, ended: bool) -> str:
    """The reply as training data: whole when the model ended it, else cut after its last full sentence."""
    text = text.strip()
    if ended:
        return text
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else ""


def replay_conversations(
    path: Path, prompts: list[str], generate: Callable[[list[str]], list[tuple[str, bool]]]
) -> list[list[dict]]:
    """Conversations [user, assistant] of `prompts` and the replies `generate` gives (text, ended), cached at
    `path` (JSONL): a cache made from the same prompts is read back instead of generating again."""
    path = Path(path)
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [r.get("prompt") for r in rows] == prompts:
            return [r["messages"] for r in rows if r["messages"]]
    rows = []
    for q, (text, ended) in zip(prompts, generate(prompts)):
        reply = trim_reply(text, ended)
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": reply}] if reply else []
        rows.append({"prompt": q, "messages": msgs})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return [r["messages"] for r in rows if r["messages"]]
