"""Checkpoint directories: round trip, atomic replacement, carried-over files, clear errors, no pickled code."""

import json

import pytest
import torch

from chatstack.checkpoint import CheckpointError, load_checkpoint, load_state, recover, save_checkpoint
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["hello world, a tiny corpus 123"] * 10, vocab_size=280, show_progress=False)


def _save(path, model, tok, step=1):
    return save_checkpoint(
        path,
        model,
        {"model": model.config.to_dict(), "stage": "test", "step": step},
        tokenizer=tok,
        state={"trainer": {"step": step, "rng": torch.get_rng_state()}},
    )


@pytest.mark.parametrize("preset", ["nano", "nano-llama"])
def test_round_trip(tmp_path, tok, preset):
    torch.manual_seed(0)
    m = GPT(get_preset(preset))
    _save(tmp_path / "ck", m, tok)
    ck = load_checkpoint(tmp_path / "ck", with_state=True)
    x = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(ck.model(x), m(x))
    assert ck.config["stage"] == "test" and ck.config["format"] == 1
    assert ck.tokenizer.encode("hello") == tok.encode("hello")
    assert ck.state["trainer"]["step"] == 1
    if m.config.tie_embeddings:
        assert ck.model.lm_head.weight is ck.model.tok_emb.weight


def test_resave_replaces_atomically_and_keeps_metrics(tmp_path, tok):
    m = GPT(get_preset("nano"))
    path = _save(tmp_path / "ck", m, tok, step=1)
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    _save(path, m, tok, step=2)
    assert json.loads((path / "config.json").read_text())["step"] == 2
    assert (path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not any(p.name.startswith(".ck.") for p in tmp_path.iterdir())


def test_recover_after_crash_between_renames(tmp_path, tok):
    m = GPT(get_preset("nano"))
    path = _save(tmp_path / "ck", m, tok, step=1)
    # simulate: the new copy is complete in .ck.tmp, the old one was moved to .ck.old, then the process died
    tmp, old = tmp_path / ".ck.tmp", tmp_path / ".ck.old"
    _save(tmp_path / "other", m, tok, step=2).rename(tmp)
    (tmp / ".complete").touch()
    path.rename(old)
    recover(path)
    assert json.loads((path / "config.json").read_text())["step"] == 2 and not old.exists()


def test_errors_name_the_file(tmp_path, tok):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")
    m = GPT(get_preset("nano"))
    path = _save(tmp_path / "ck", m, tok)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: corrupt JSON"):
        load_checkpoint(path)


def test_state_refuses_pickled_code(tmp_path, tok):
    m = GPT(get_preset("nano"))
    path = _save(tmp_path / "ck", m, tok)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "state" / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_state(path)
