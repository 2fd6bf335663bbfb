"""Preference data (chatstack/data/preferences.py): rankings, TRL pairs, grouping, validation, split."""

import json

import pytest

from chatstack.data.preferences import PreferenceError, load_preferences, split_by_prompt, summary, write_rankings


def _write(tmp_path, rows, name="p.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_ranking_gives_all_ordered_pairs(tmp_path):
    p = _write(tmp_path, [{"prompt": [{"role": "user", "content": "2+2?"}], "responses": ["4", "5", "fish", "?"]}])
    (g,) = load_preferences(p)
    assert g.responses == ["4", "5", "fish", "?"]
    assert sorted(g.pairs) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # C(4,2) = 6, best first
    assert g.prompt == [{"role": "user", "content": "2+2?"}]


def test_scores_mark_ties(tmp_path):
    p = _write(tmp_path, [{"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 0, 0]}])
    (g,) = load_preferences(p)
    assert sorted(g.pairs) == [(0, 1), (0, 2)]  # b and c are tied: not compared


def test_trl_pairs_group_by_prompt(tmp_path):
    p = _write(
        tmp_path,
        [
            {"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"},
            {"prompt": "What is 1+1?", "chosen": "2", "rejected": "two!"},
            {"prompt": "Other", "chosen": "x", "rejected": "y"},
            # TRL conversational, implicit prompt
            {
                "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}],
            },
        ],
    )
    groups = load_preferences(p)
    assert summary(groups) == {"prompts": 3, "responses": 7, "pairs": 4}
    g = groups[0]
    assert g.prompt == [{"role": "user", "content": "What is 1+1?"}]
    assert g.responses == ["2", "3", "two!"] and g.pairs == [(0, 1), (0, 2)]
    assert groups[2].prompt == [{"role": "user", "content": "Hi"}] and groups[2].responses == ["Hello!", "Go away"]


@pytest.mark.parametrize(
    "row,needle",
    [
        ("{not json", "p.jsonl:2: bad JSON"),
        ({"prompt": "q", "responses": ["a"]}, "at least 2"),
        ({"prompt": "q", "responses": ["a", "a"]}, "duplicate"),
        ({"prompt": [{"role": "robot", "content": "x"}], "responses": ["a", "b"]}, "prompt[0].role"),
        ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ({"responses": ["a", "b"]}, "missing field 'prompt'"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [0, 1]}, "non-increasing"),
        ({"text": "hello"}, "neither a ranking"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, row, needle):
    p = _write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(PreferenceError) as e:
        load_preferences(p)
    assert "p.jsonl:2" in str(e.value) and needle in str(e.value)


def test_split_by_prompt_is_deterministic_and_disjoint(tmp_path):
    rows = [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(200)]
    groups = load_preferences(_write(tmp_path, rows))
    tr, va = split_by_prompt(groups, 0.2, seed=0)
    tr2, va2 = split_by_prompt(groups, 0.2, seed=0)
    assert [g.key for g in va] == [g.key for g in va2]
    assert not {g.key for g in tr} & {g.key for g in va}
    assert 20 <= len(va) <= 60 and len(tr) + len(va) == 200


def test_write_rankings_roundtrip(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "q"}], "responses": ["b\u00e9st", "worst"]}]
    write_rankings(tmp_path / "r.jsonl", rows)
    (g,) = load_preferences(tmp_path / "r.jsonl")
    assert g.responses == ["b\u00e9st", "worst"] and g.pairs == [(0, 1)]


def test_task_field_is_kept_for_per_task_accuracy(tmp_path):
    p = _write(
        tmp_path,
        [{"prompt": "1+1?", "responses": ["2", "3"], "task": "add"}, {"prompt": "x", "chosen": "a", "rejected": "b"}],
    )
    by_prompt = {g.prompt[-1]["content"]: g for g in load_preferences(p)}
    assert by_prompt["1+1?"].task == "add" and by_prompt["x"].task == ""
