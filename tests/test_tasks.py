"""Verifiable tasks: deterministic splits, no train/test leakage, exact checking, well-formedness."""

import re

import pytest

from chatstack.data.tasks import TASKS, Example, extract_final, get_task, task_conversations


@pytest.mark.parametrize("name", list(TASKS))
def test_examples_deterministic_and_split_disjoint(name):
    t = TASKS[name]
    a = t.examples("train", 50, seed=1)
    b = t.examples("train", 50, seed=1)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert [e.prompt for e in t.examples("train", 50, seed=2)] != [e.prompt for e in a]
    train = {e.prompt for e in t.examples("train", 400, seed=0)}
    test = {e.prompt for e in t.examples("test", 60, seed=0)}
    assert train and test and not (train & test), "held-out prompts leaked into train"


@pytest.mark.parametrize("name", list(TASKS))
def test_reference_answers_check_and_are_well_formed(name):
    t = TASKS[name]
    for ex in t.examples("test", 30, seed=0):
        assert t.check(ex.answer, ex), (ex.answer, ex.final)
        assert t.well_formed(ex.answer)
        assert t.score(ex.answer, ex) == 1.0
        assert "\n" not in ex.answer and len(ex.answer) < 80


def test_answers_are_arithmetically_right():
    for ex in TASKS["add"].examples("test", 20):
        a, b = map(int, re.findall(r"\d+", ex.prompt))
        assert int(ex.final) == a + b
    for ex in TASKS["sub"].examples("test", 20):
        a, b = map(int, re.findall(r"\d+", ex.prompt))
        assert int(ex.final) == a - b >= 0
    for ex in TASKS["add3"].examples("test", 20):
        a, b = map(int, re.findall(r"\d+", ex.prompt))
        assert int(ex.final) == a + b
    for ex in TASKS["compare"].examples("test", 20):
        assert int(ex.final) == max(map(int, re.findall(r"\d+", ex.prompt)))
    for ex in TASKS["reverse"].examples("test", 20):
        word = ex.prompt.split(": ")[1].replace(" ", "")
        assert ex.final.replace(" ", "") == word[::-1]
    for ex in TASKS["count"].examples("test", 20):
        m = re.match(r"How many times does (\w) appear in: (.*)\?", ex.prompt)
        assert int(ex.final) == m.group(2).replace(" ", "").count(m.group(1))


def test_extract_and_check_wrong_or_malformed():
    t = get_task("add3")
    ex = Example("add3", [{"role": "user", "content": "What is 100 + 200?"}], "0+0=0. Answer: 300", "300")
    assert extract_final("blah. Answer: 300.") == "300"
    assert extract_final("  42 ") == "42"
    assert t.check("whatever. Answer: 300", ex)
    assert not t.check("whatever. Answer: 301", ex)
    assert t.score("x. Answer: 301", ex) == 0.0  # wrong but well-formed
    assert t.score("three hundred", ex) == -1.0  # no Answer:, not a number
    assert t.score("Answer: 3 Answer: 300", ex) == 1.0  # correct wins, though malformed
    assert not t.well_formed("Answer: 3 Answer: 300")
    assert not t.well_formed("1+2=3\nAnswer: 300")
    r = get_task("reverse")
    assert r.well_formed("t a c") and not r.well_formed("tac!") and not r.well_formed("T A C")


def test_unknown_names_and_splits():
    with pytest.raises(KeyError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ValueError, match="split"):
        TASKS["add"].examples("val", 3)


def test_task_conversations_shape():
    convs = task_conversations("train", 3, names=["add", "count"])
    assert len(convs) == 6
    for c in convs:
        assert [m["role"] for m in c["messages"]] == ["user", "assistant"]


def test_task_weights_scale_counts_and_small_key_spaces_stay_fast():
    import collections

    convs = task_conversations("train", 10, seed=0, names=["add", "add3"], weights={"add3": 2.0})
    assert collections.Counter(c["task"] for c in convs) == {"add": 10, "add3": 20}
    with pytest.raises(ValueError, match="unknown task"):
        task_conversations("train", 10, weights={"mul": 1.0})
    # reverse has ~110 train words: 3,000 examples must use them all, then repeat (no endless search for new ones)
    exs = TASKS["reverse"].examples("train", 3000, seed=0)
    assert len(exs) == 3000
    words = {e.prompt for e in exs}
    assert 80 < len(words) < 200
    assert not words & {e.prompt for e in TASKS["reverse"].examples("test", 300, seed=0)}
