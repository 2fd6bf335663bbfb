"""Prompting helpers: answer extraction, majority vote with share, few-shot prompts, self-consistency runs.

python -m pytest tests/test_prompting.py -q
"""

import json

import pytest
from helpers import nano_model, small_tokenizer

from chatstack.infer.engine import Completion, Engine
from chatstack.infer.prompting import (
    COT_TRIGGER,
    extract_answer,
    few_shot_prompt,
    load_examples,
    majority_vote,
    normalize_answer,
    self_consistency,
)


@pytest.mark.parametrize(
    "text,want",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("so 3 + 4 = 7. The answer is 7.", "7"),
        ("Answer: $1,200 dollars", "1200"),
        ("The final answer is \\boxed{12.50}", "12.5"),
        ("I have 3 apples and eat 1, leaving 2", "2"),
        ("The answer is Paris.", "Paris"),
        ("#### 5\nsome trailing talk with 99", "5"),  # the marker beats a later number
        ("answer: 3. Wait, no. The answer is 4", "4"),  # the last marker wins
        ("no digits here", None),
        ("-3.0 degrees", "-3"),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_normalize_answer():
    assert normalize_answer(" $1,000.00. ") == "1000"
    assert normalize_answer("**42**") == "42"
    assert normalize_answer("Paris.") == "Paris"


def test_majority_vote_share_and_ties():
    assert majority_vote(["4", "5", "4", None]) == ("4", 0.5, {"4": 2, "5": 1})
    best, share, _ = majority_vote(["b", "a", "a", "b"])
    assert best == "b" and share == 0.5  # tie -> first seen
    assert majority_vote([None, None]) == (None, 0.0, {})


def test_few_shot_prompt_layout(tmp_path):
    exs = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
    p = few_shot_prompt(exs, "5+5?", instruction="Solve.", cot=True)
    assert p == f"Solve.\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA: 6\n\nQ: 5+5?\nA: {COT_TRIGGER}"
    assert few_shot_prompt(exs, "x", shots=1) == "Q: 2+2?\nA: 4\n\nQ: x\nA:"
    f = tmp_path / "ex.jsonl"
    f.write_text(json.dumps({"input": "a", "output": "b"}) + "\n\n" + json.dumps({"question": 1}) + "\n")
    with pytest.raises(ValueError, match=r"ex.jsonl:3"):
        load_examples(f)


class _FakeEngine:
    """Returns scripted texts, records the params it was asked for."""

    def __init__(self, texts):
        self.texts, self.params = texts, None

    def generate(self, prompts, params):
        self.params = params
        return [Completion(p, [], t, "stop") for p, t in zip(prompts, self.texts)]


def test_self_consistency_votes_over_paths_and_temperatures():
    eng = _FakeEngine(["... #### 12", "so the answer is 12.", "I get 13", "answer: 12", "hmm"])
    r = self_consistency(eng, [1, 2], paths=5, temperatures=[0.5, 1.0], seed=10)
    assert r.answer == "12" and r.share == pytest.approx(3 / 5) and r.votes == {"12": 3, "13": 1}
    assert [p.temperature for p in eng.params] == [0.5, 1.0, 0.5, 1.0, 0.5]
    assert [p.seed for p in eng.params] == [10, 11, 12, 13, 14]
    assert [p["answer"] for p in r.paths] == ["12", "12", "13", "12", None]


def test_self_consistency_with_real_engine_is_reproducible():
    tok = small_tokenizer()
    eng = Engine(nano_model("nano", tok.vocab_size), tok)
    ids = tok.encode(few_shot_prompt([{"question": "What is 12 plus 30?", "answer": "42"}], "What is 1 plus 1?"))
    a = self_consistency(eng, ids, paths=4, temperatures=[0.7, 1.0], max_new_tokens=8, seed=3)
    b = self_consistency(eng, ids, paths=4, temperatures=[0.7, 1.0], max_new_tokens=8, seed=3)
    assert a == b and len(a.paths) == 4
    assert a.share == (max(a.votes.values()) / 4 if a.votes else 0.0)


def test_few_shot_messages_for_chat_models():
    from chatstack.infer.prompting import few_shot_messages

    exs = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
    msgs = few_shot_messages(exs, "5+5?", shots=1, system="Answer with a number.", cot=True)
    assert msgs == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": f"5+5? {COT_TRIGGER}"},
    ]
