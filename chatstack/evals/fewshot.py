"""Few-shot prompts for base models: how a model that never saw a chat template is asked a task.

GPT-2/GPT-3's idea (zero-/few-shot): show k solved examples in plain text, then the question, and let the
model continue. The solved examples come from the task's *train* split, so they never leak held-out
answers; the same k shots are used for every question of a task (seeded), as in the GPT-3 paper.

    Q: What is 12 + 30?
    A: 42

    Q: What is 51 + 17?
    A:

The first non-empty line of the model's continuation is its answer, checked exactly like a chat reply.

    from chatstack.evals.fewshot import fewshot_prompt
    text = fewshot_prompt(TASKS["add"], example, shots=3, seed=0)
"""

from __future__ import annotations

from chatstack.data.tasks import Example, Task

# every answer is one line; a base model may first emit a newline or space after "A:", so generation stops
# at a blank line or the next question, and the answer is the first non-empty line (`first_line`)
STOP = ["\n\n", "\nQ:"]


def first_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().split("\n")]
    return lines[0] if lines else ""


def shots_for(task: Task, k: int, seed: int = 0) -> list[Example]:
    """k solved training examples of `task` (deterministic)."""
    return task.examples("train", k, seed=10_000 + seed) if k > 0 else []


def format_qa(question: str, answer: str | None = None) -> str:
    return f"Q: {question}\nA:" + (f" {answer}\n\n" if answer is not None else "")


def fewshot_prompt(task: Task, example: Example, shots: int = 3, seed: int = 0) -> str:
    """Plain-text prompt: `shots` solved examples, then the question, ending in 'A:'."""
    return "".join(format_qa(s.prompt, s.answer) for s in shots_for(task, shots, seed)) + format_qa(example.prompt)
