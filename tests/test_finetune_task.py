"""GPT-1 task fine-tuning: input transformations, the head model, the built-in sets, the two commands.

python3 -m pytest -q tests/test_finetune_task.py
"""

import json

import pytest
import torch

from chatstack.checkpoint import save_checkpoint
from chatstack.cli import main
from chatstack.data.shards import DataError
from chatstack.data.task_sets import builtin_task_set, play_speeches, read_task_file
from chatstack.heads import DELIM, EXTRACT, START, TaskModel, collate, encode_examples, predict, transform
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.tokenizer import Tokenizer

V = 300


def enc(text):
    return [ord(c) % 50 + 10 for c in text]  # a stand-in tokenizer: one id per character


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    texts = ["the cat sat on the mat. a bird sang in the tree. the dog ran far."] * 3
    tok = Tokenizer.train(texts, vocab_size=V, show_progress=False)
    torch.manual_seed(0)
    cfg = get_preset("nano", vocab_size=tok.vocab_size, block_size=64)
    path = tmp_path_factory.mktemp("task") / "base"
    save_checkpoint(path, GPT(cfg), {"stage": "base", "model": cfg.to_dict(), "tokenizer": tok.info()}, tok)
    return path


def test_token_layout_of_each_transformation():
    s, d, e = V + START, V + DELIM, V + EXTRACT
    assert transform("classify", enc, {"text": "ab"}, V, 32) == [[s, *enc("ab"), e]]
    assert transform("entail", enc, {"premise": "ab", "hypothesis": "c"}, V, 32) == [[s, *enc("ab"), d, *enc("c"), e]]
    sim = transform("similar", enc, {"a": "ab", "b": "c"}, V, 32)
    assert sim == [[s, *enc("ab"), d, *enc("c"), e], [s, *enc("c"), d, *enc("ab"), e]]
    ch = transform("choice", enc, {"context": "x", "options": ["p", "qq", "r"]}, V, 32)
    assert ch == [[s, *enc("x"), d, *enc(o), e] for o in ("p", "qq", "r")]


def test_long_inputs_are_cut_to_max_len():
    seqs = transform("entail", enc, {"premise": "a" * 50, "hypothesis": "b" * 50}, V, 20)
    assert len(seqs[0]) == 20 and seqs[0][0] == V + START and seqs[0][-1] == V + EXTRACT
    assert V + DELIM in seqs[0]
    (cls,) = transform("classify", enc, {"text": "z" * 99}, V, 10)
    assert len(cls) == 10


def test_collate_positions_and_lm_targets():
    b = collate([[[V, 5, 6, V + 2]], [[V, 7, V + 2]]], base_vocab=V)
    assert b["idx"].shape == (2, 1, 4) and b["last"].tolist() == [[3], [2]]
    # next-token targets only where a text token follows a text token, before the extract token
    assert b["lm_targets"][0, 0].tolist() == [-1, 6, -1, -1]
    assert b["lm_targets"][1, 0].tolist() == [-1, -1, -1, -1]


def _model(kind, n_classes=3, seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("nano", vocab_size=V + 3, block_size=64)
    return TaskModel(cfg, kind, n_classes, V).eval()


def test_similarity_is_symmetric_by_construction():
    m = _model("similar", 2)
    ex1 = transform("similar", enc, {"a": "hello there", "b": "bye"}, V, 32)
    ex2 = transform("similar", enc, {"a": "bye", "b": "hello there"}, V, 32)
    b1, b2 = collate([ex1]), collate([ex2])
    with torch.no_grad():
        torch.testing.assert_close(m.scores(b1["idx"], b1["last"]), m.scores(b2["idx"], b2["last"]))


def test_multiple_choice_is_a_softmax_over_options():
    m = _model("choice")
    ex = {"context": "a b", "options": ["c", "dd", "e", "ff"], "label": 2}
    encoded = encode_examples("choice", enc, [ex], V, 32, [])
    b = collate([encoded[0][0]], base_vocab=V)
    b["labels"] = torch.tensor([2])
    with torch.no_grad():
        scores = m.scores(b["idx"], b["last"])  # (1, 4): one score per option
        assert scores.shape == (1, 4)
        # each option's score depends on that option's sequence alone: scoring it by itself gives the same
        for i in range(4):
            one = collate([[encoded[0][0][i]]])
            torch.testing.assert_close(m.scores(one["idx"], one["last"])[0, 0], scores[0, i])
        loss, _ = m.loss(b, lm_coef=0.0)
        assert float(loss) == pytest.approx(float(-torch.log_softmax(scores, -1)[0, 2]), rel=1e-5)


def test_padding_does_not_change_a_prediction():
    m = _model("classify")
    short = transform("classify", enc, {"text": "ab"}, V, 32)
    long = transform("classify", enc, {"text": "a much longer text here"}, V, 32)
    with torch.no_grad():
        alone = m.scores(**{k: v for k, v in collate([short]).items()})
        padded = m.scores(**{k: v for k, v in collate([short, long]).items()})[:1]
    torch.testing.assert_close(alone, padded)


def test_from_base_copies_weights_and_adds_three_rows():
    torch.manual_seed(0)
    base = GPT(get_preset("nano", vocab_size=V, block_size=64))
    m = TaskModel.from_base(base, "classify", 2)
    assert m.gpt.tok_emb.weight.shape[0] == V + 3
    torch.testing.assert_close(m.gpt.tok_emb.weight[:V], base.tok_emb.weight)
    torch.testing.assert_close(m.gpt.blocks[0].mlp.fc.weight, base.blocks[0].mlp.fc.weight)
    r = TaskModel.from_base(None, "classify", 2, cfg=base.config)
    assert not torch.equal(r.gpt.blocks[0].mlp.fc.weight, base.blocks[0].mlp.fc.weight)
    mean = TaskModel.from_base(base, "classify", 2, special_init="mean", dropout=0.1)
    torch.testing.assert_close(mean.gpt.tok_emb.weight[V:], base.tok_emb.weight.mean(0).expand(3, -1))
    torch.testing.assert_close(mean.gpt.tok_emb.weight[:V], base.tok_emb.weight)
    assert mean.config.dropout == 0.1 and m.config.dropout == base.config.dropout


def test_builtin_sets_are_built_and_split_by_play():
    for name in ("shakespeare-entail", "shakespeare-similar", "shakespeare-choice", "shakespeare-speaker"):
        tr, te = builtin_task_set(name)
        assert len(tr) > 500 and len(te) > 200
        text = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
        assert not {text(r) for r in tr} & {text(r) for r in te}
    tr, te = builtin_task_set("shakespeare-entail")
    assert 0.4 < sum(r["label"] for r in te) / len(te) < 0.6
    tr, te = builtin_task_set("chatterbot-topics")
    assert len({r["label"] for r in tr}) >= 4 and not {r["text"] for r in tr} & {r["text"] for r in te}


def test_neighbour_pairs_are_near_or_far_in_the_dialogue():
    """shakespeare-similar: label 1 exactly when the two lines stand within WINDOW lines of each other, by
    positions recomputed from the play text; both orders occur."""
    from chatstack.data.builtin import builtin_documents
    from chatstack.data.task_sets import FAR, TEST_PLAYS, WINDOW

    docs = dict(builtin_documents("shakespeare", "val"))
    lines = [l for _, v in play_speeches(docs[TEST_PLAYS[0]]) for l in v]
    where: dict[str, list[int]] = {}
    for i, l in enumerate(lines):
        where.setdefault(l, []).append(i)
    _, te = builtin_task_set("shakespeare-similar")
    assert 0.45 < sum(r["label"] for r in te) / len(te) < 0.55
    forward = 0
    for r in te:
        gaps = [j - i for i in where[r["a"]] for j in where[r["b"]]]
        if r["label"] == 1:
            assert any(0 < abs(g) <= WINDOW for g in gaps)
            forward += any(0 < g <= WINDOW for g in gaps)
        else:
            assert any(abs(g) > FAR for g in gaps)
    positives = sum(r["label"] for r in te)
    assert 0.3 < forward / positives < 0.7  # the order carries no label


def test_play_parsing():
    text = "Ham.\nTo be, or not to be, that is the question:\nWhether 'tis nobler\n\n[Exit.]\n\nHor.\nMy lord?\n"
    assert play_speeches(text) == [
        ("Ham", ["To be, or not to be, that is the question:", "Whether 'tis nobler"]),
        ("Hor", ["My lord?"]),
    ]


def test_bad_task_files_name_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: missing field 'label'"):
        read_task_file(p, "classify")
    p.write_text('{"context": "a", "options": ["x"], "label": 0}\n')
    with pytest.raises(DataError, match=r"t.jsonl:1: 'options' must be a list of at least two"):
        read_task_file(p, "choice")
    p.write_text('{"context": "a", "options": ["x", "y"], "label": 2}\n')
    with pytest.raises(DataError, match=r":1: 'label' must be the index"):
        read_task_file(p, "choice")


def test_finetune_and_eval_task_cli(base_ckpt, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    rows = [
        {
            "a": "the cat sat" if i % 2 else "a bird sang",
            "b": "on the mat" if i % 3 else "in the tree",
            "label": "same" if i % 2 else "other",
        }
        for i in range(40)
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sim"
    rc = main(
        [
            "finetune-task",
            "--base",
            str(base_ckpt),
            "--task",
            "similar",
            "--data",
            str(train),
            "--out",
            str(out),
            "--max-steps",
            "40",
            "--batch-size",
            "8",
            "--no-progress",
            "--eval-every",
            "0",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["eval-task", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "similar" and res["n"] == 4 and 0 <= res["accuracy"] <= 1
    assert res["ci95"][0] <= res["accuracy"] <= res["ci95"][1]
    # the same checkpoint on a file with the same fields; its metrics show the auxiliary LM loss was trained
    assert main(["eval-task", str(out), "--data", str(train), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 40 and res["accuracy"] > 0.9  # the labels follow the first sentence: learnable
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("lm_loss" in m for m in metrics)


def test_epochs_set_the_step_count(base_ckpt, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the cat {i}", "label": i % 2}) + "\n" for i in range(40)))
    out = tmp_path / "cls"
    argv = ["finetune-task", "--base", str(base_ckpt), "--task", "classify", "--data", str(train), "--out", str(out)]
    assert main([*argv, "--epochs", "1.5", "--batch-size", "8", "--no-progress", "--eval-every", "0"]) == 0
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 7  # 36 training examples (4 held out) x 1.5 epochs / 8 per batch, rounded up


def test_cli_errors(base_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "a", "label": 1}\n')
    rc = main(
        [
            "finetune-task",
            "--base",
            str(base_ckpt),
            "--task",
            "entail",
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "bad.jsonl:1: missing field 'hypothesis'" in capsys.readouterr().err
    rc = main(
        [
            "finetune-task",
            "--base",
            str(base_ckpt),
            "--task",
            "entail",
            "--builtin",
            "shakespeare-choice",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "is a choice set" in capsys.readouterr().err
    assert main(["eval-task", str(base_ckpt)]) == 2
    assert "not a task checkpoint" in capsys.readouterr().err


def test_predict_groups_option_counts():
    m = _model("choice")
    exs = [
        {"context": "a", "options": ["b", "c"], "label": 0},
        {"context": "a", "options": ["b", "c", "d"], "label": 1},
    ]
    preds = predict(m, encode_examples("choice", enc, exs, V, 32, []))
    assert len(preds) == 2 and preds[0] in (0, 1) and preds[1] in (0, 1, 2)
