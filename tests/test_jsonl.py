"""The shared JSONL reader: values with line numbers, blank lines skipped, errors naming file and line."""

import pytest

from chatstack.data.jsonl import iter_jsonl


def test_values_with_line_numbers(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n[2, 3]\n"x"\n')
    assert list(iter_jsonl(p)) == [(1, {"a": 1}), (3, [2, 3]), (4, "x")]


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: bad JSON"):
        list(iter_jsonl(p))


def test_bad_utf8_is_a_clear_error(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b": "\xff\xfe"}\n')
    with pytest.raises(KeyError, match="not valid UTF-8"):
        list(iter_jsonl(p, error=KeyError))
