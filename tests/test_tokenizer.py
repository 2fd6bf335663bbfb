"""Tokenizer: GPT-2 ids against tiktoken, exact Unicode round trips, ChatML rendering and its loss mask."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatstack.cli import main
from chatstack.tokenizer import GIL_FREE_CHARS, IM_END, IM_START, Tokenizer

CORPUS = [
    "To be, or not to be, that is the question: 12 + 34 = 46.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows",
    "héllo wörld 🙂 你好",
] * 20


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(CORPUS, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str

    from chatstack.tokenizer import _gpt2_ranks_path

    ranks = tiktoken.load.load_tiktoken_bpe(str(_gpt2_ranks_path()))
    return tiktoken.Encoding(
        "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def test_gpt2_worked_example(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    ids = [16594, 257, 1621, 546, 1271, 17031, 2231, 3134, 13]
    assert gpt2.encode("Write a story about number 1234567.") == ids
    assert gpt2.decode(ids) == "Write a story about number 1234567."
    assert gpt2.eot_id == 50256 and gpt2.im_start_id == 50257 and gpt2.im_end_id == 50258


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_gpt2_matches_tiktoken_and_round_trips(gpt2, tiktoken_gpt2, s):
    ids = gpt2.encode(s)
    assert ids == tiktoken_gpt2.encode_ordinary(s)
    assert gpt2.decode(ids) == s


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_trained_round_trip(trained, s):
    assert trained.decode(trained.encode(s)) == s


def test_long_texts_encode_the_same_through_the_gil_free_call(gpt2, tiktoken_gpt2):
    """Texts over GIL_FREE_CHARS go through `encode_batch` (it releases the GIL; `encode` holds it): same ids."""
    text = "".join(CORPUS) * (GIL_FREE_CHARS // len("".join(CORPUS)) + 2)
    assert len(text) > GIL_FREE_CHARS
    assert gpt2.encode(text) == gpt2.hf.encode(text, add_special_tokens=False).ids == tiktoken_gpt2.encode(text)
    calls = []

    class Spy:  # the HF tokenizer, recording which call was made
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    real, gpt2.hf = gpt2.hf, Spy()
    try:
        gpt2.encode(text)
        gpt2.encode("short")
    finally:
        gpt2.hf = real
    assert calls == ["encode_batch", "encode"]


def test_digits_split_one_per_token(trained):
    ids = trained.encode("1234567")
    assert len(ids) == 7 and [trained.decode([i]) for i in ids] == list("1234567")


def test_special_strings_in_text_are_plain_text(trained):
    ids = trained.encode(f"{IM_START}user")
    assert trained.im_start_id not in ids
    assert trained.decode(ids) == f"{IM_START}user"


def test_token_bytes_concatenate_to_utf8(trained):
    s = "héllo 🙂"
    assert b"".join(trained.token_bytes(i) for i in trained.encode(s)) == s.encode("utf-8")


def test_render_chat_mask_covers_assistant_only(trained):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ids, mask = trained.render_chat(msgs)
    assert len(ids) == len(mask)
    text = trained.decode(ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    trained_text = trained.decode([i for i, m in zip(ids, mask) if m])
    assert trained_text == f"Hello!{IM_END}4{IM_END}"
    # the prompt for generation is exactly the prefix of the rendered chat up to the assistant's content
    prompt = trained.render_prompt(msgs[:2])
    assert ids[: len(prompt)] == prompt
    assert trained.decode(prompt).endswith("<|im_start|>assistant\n")


def test_unknown_role_names_index(trained):
    with pytest.raises(ValueError, match="message 1: unknown role 'bot'"):
        trained.render_chat([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}])


def test_save_load(tmp_path, trained):
    trained.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode("To be 123") == trained.encode("To be 123") and again.vocab_size == trained.vocab_size


def test_cli_encode_decode(capsys):
    assert main(["tokenizer", "encode", "--gpt2", "Write a story about number 1234567."]) == 0
    assert json.loads(capsys.readouterr().out) == [16594, 257, 1621, 546, 1271, 17031, 2231, 3134, 13]
    assert main(["tokenizer", "decode", "--gpt2", "[16594, 257, 1621, 546, 1271, 17031, 2231, 3134, 13]"]) == 0
    assert capsys.readouterr().out == "Write a story about number 1234567.\n"
    assert main(["tokenizer", "decode", "--gpt2", "[99999999]"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_cli_train_on_files(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "more text 42"}) + "\n")
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "a.txt"),
                str(tmp_path / "b.jsonl"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size <= 300
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    assert main(["tokenizer", "train", "--input", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "t2")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
