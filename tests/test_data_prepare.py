"""Data preparation: shards hold exactly the tokenized documents, splits are by document, mixtures sample
by weight, and every kind of bad input is a clear error that leaves nothing half-written.

    python -m pytest tests/test_data_prepare.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import doc, make_dataset, tiny_tokenizer  # noqa: E402

from chatstack.data.mixture import Mixture, parse_spec
from chatstack.data.shards import DataError, TokenDataset, tokenizer_fingerprint
from chatstack.stages.prepare import iter_documents, prepare, split_documents


def test_shards_hold_the_documents_separated_by_eot(tmp_path):
    path = make_dataset(tmp_path)
    ds = TokenDataset(path)
    tok = tiny_tokenizer()
    assert ds.meta["dtype"] == "uint16"
    train = ds.split("train")
    # independent reference: encode each training document alone, append <|endoftext|>
    docs = [doc(i) for i in range(12) if i % 4 != 3]
    expect = [t for d in docs for t in tok.encode(d) + [tok.eot_id]]
    assert train.tokens.tolist() == expect
    assert train.info["documents"] == 9 and train.info["bytes"] == sum(len(d.encode()) for d in docs)
    val = ds.split("val")
    assert val.tokens.tolist() == [t for i in (3, 7, 11) for t in tok.encode(doc(i)) + [tok.eot_id]]
    assert tok.decode([t for t in val.tokens.tolist() if t != tok.eot_id]) == doc(3) + doc(7) + doc(11)


def test_several_shards_and_uint32_for_big_vocab(tmp_path):
    from chatstack.data.shards import dtype_for_vocab

    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    tok = tiny_tokenizer()
    docs = [(f"d{i}", doc(i)) for i in range(6)]
    path = prepare(tmp_path / "d", tok, docs, docs[:1], [{"name": "x"}], shard_tokens=100)
    ds = TokenDataset(path)
    shards = ds.meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 100 for s in shards[:-1])
    expect = [t for _, d in docs for t in tok.encode(d) + [tok.eot_id]]
    assert ds.split("train").tokens.tolist() == expect


def test_jsonl_and_folder_inputs(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("alpha\n")
    (tmp_path / "f" / "b.jsonl").write_text(
        json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n"
    )
    (tmp_path / "f" / "img.png").write_bytes(b"\x89PNG")  # not a text suffix: skipped
    docs = list(iter_documents([tmp_path / "f"]))
    assert [t for _, t in docs] == ["alpha\n", "beta", "gamma"]


def test_split_by_document_and_lone_document():
    docs = [(f"d{i}", f"text {i}\n") for i in range(10)]
    train, val = split_documents(docs, 0.2)
    assert [n for n, _ in val] == ["d4", "d9"] and len(train) == 8
    lone = [("book", "".join(f"line {i}\n" for i in range(100)))]
    train, val = split_documents(lone, 0.1)
    assert train[0][1] + val[0][1] == lone[0][1] and val[0][1].startswith("line 90\n")


def test_builtin_shakespeare_holds_out_whole_plays():
    from chatstack.data.builtin import BUILTIN_CORPORA, builtin_documents

    assert "shakespeare" in BUILTIN_CORPORA
    train = {n for n, _ in builtin_documents("shakespeare", "train")}
    val = {n for n, _ in builtin_documents("shakespeare", "val")}
    assert len(train) + len(val) == 42 and len(val) >= 2 and not train & val


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"good line\nbad \xff\xfe byte\n"), r":2: undecodable"),
        (lambda p: p.with_suffix(".jsonl").write_text('{"text": "ok"}\n{"text": 3}\n'), r"\.jsonl:2: field 'text'"),
        (lambda p: p.with_suffix(".jsonl").write_text('{"text": "ok"}\n{broken\n'), r"\.jsonl:2: invalid JSON"),
        (lambda p: p.with_suffix(".jsonl").write_text('{"body": "ok"}\n'), r"\.jsonl:1: no 'text' field"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, setup, match):
    p = tmp_path / "corpus.txt"
    setup(p)
    target = p.with_suffix(".jsonl") if p.with_suffix(".jsonl").exists() else p
    with pytest.raises(DataError, match=match) as e:
        list(iter_documents([target]))
    assert target.name in str(e.value)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from chatstack.cli import main

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save(tok_dir)
    (tmp_path / "empty.txt").write_text("")
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(tmp_path / "empty.txt"),
            "--val-fraction",
            "0",
            "--tokenizer",
            str(tok_dir),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2 and "empty corpus" in capsys.readouterr().err
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(tmp_path / "nope.txt"),
            "--tokenizer",
            str(tok_dir),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2 and "nope.txt: no such file" in capsys.readouterr().err
    rc = main(
        [
            "data",
            "prepare",
            "--builtin",
            "shakespeare",
            "--tokenizer",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2 and "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_prepare_end_to_end(tmp_path, capsys):
    from chatstack.cli import main

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save(tok_dir)
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(10)))
    rc = main(["data", "prepare", "--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "out")])
    assert rc == 0
    ds = TokenDataset(tmp_path / "out")
    assert ds.meta["splits"]["train"]["documents"] == 9 and ds.meta["splits"]["val"]["documents"] == 1
    assert (tmp_path / "out" / "tokenizer.json").exists()
    ds.tokenizer()  # the saved tokenizer matches the shards


def test_failure_midway_leaves_no_partial_output(tmp_path, monkeypatch):
    import chatstack.stages.prepare as P

    path = make_dataset(tmp_path)
    before = (path / "meta.json").read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(P, "tokenize_split", boom)
    with pytest.raises(RuntimeError):
        prepare(path, tiny_tokenizer(), [("d", doc(0))], [], [{"name": "x"}])
    assert (path / "meta.json").read_text() == before  # the old dataset is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_truncated_shard_and_tokenizer_mismatch_are_caught(tmp_path):
    path = make_dataset(tmp_path)
    other = tiny_tokenizer(280)
    assert tokenizer_fingerprint(other) != TokenDataset(path).fingerprint
    with pytest.raises(DataError, match="re-run `chatstack data prepare`"):
        TokenDataset(path).check_tokenizer(other)
    shard = path / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match="train_000.bin: .* expected"):
        TokenDataset(path).split("train")


def test_mixture_samples_by_weight_and_is_deterministic(tmp_path):
    a = make_dataset(tmp_path, "a")
    b = make_dataset(tmp_path, "b", n_docs=8)  # smaller source: its weight, not its size, decides
    assert parse_spec(f"{a}:3,{b}:1") == [(str(a), 3.0), (str(b), 1.0)]
    mix = Mixture.from_spec(f"{a}:3,{b}:1")
    r1 = mix.sample_rows(seed=1, step=5, n_rows=8, block_size=16)
    assert r1.shape == (8, 17) and r1.dtype.is_floating_point is False
    assert (mix.sample_rows(1, 5, 8, 16) == r1).all() and not (mix.sample_rows(1, 6, 8, 16) == r1).all()
    src, _ = mix.draw(seed=0, step=0, n_rows=4000)
    assert abs(float((src == 0).float().mean()) - 0.75) < 0.03  # 3:1 by weight
    # mixture files: JSON and "path weight" lines, relative to the file
    (tmp_path / "mix.json").write_text(json.dumps({"sources": [{"path": "a", "weight": 2}, {"path": "b"}]}))
    assert parse_spec(str(tmp_path / "mix.json")) == [(str(tmp_path / "a"), 2.0), (str(tmp_path / "b"), 1.0)]
    (tmp_path / "mix.txt").write_text("# comment\na 0.5\nb 0.5\n")
    assert [w for _, w in parse_spec(str(tmp_path / "mix.txt"))] == [0.5, 0.5]


def test_mixture_rejects_sources_with_different_tokenizers(tmp_path):
    a = make_dataset(tmp_path, "a")
    b = make_dataset(tmp_path, "b", vocab_size=280)
    with pytest.raises(DataError, match="share one tokenizer"):
        Mixture.from_spec(f"{a},{b}")
