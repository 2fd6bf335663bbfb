"""Conversation JSONL validation, ChatML rendering with assistant-only loss, packing with per-conversation attention."""

import json

import pytest
import torch

from chatstack.data.conversations import (
    ConversationError,
    LoadSummary,
    encode_conversations,
    load_conversations,
    make_batch,
    pack,
    read_jsonl,
    render,
    with_system,
)
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.tokenizer import Tokenizer

TEXT = (
    "Hello there, how are you today? I am fine, thank you. What is 12 + 30? It is 42. "
    "The quick brown fox jumps over the lazy dog. user assistant system "
) * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300, show_progress=False)


def conv(*pairs, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in pairs:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": [', "bad JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty content"),
        ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "must be a string"),
    ],
)
def test_validation_errors_name_file_line_problem(tmp_path, line, problem):
    good = json.dumps({"messages": conv(("hi", "hello"))})
    p = tmp_path / "d.jsonl"
    p.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ConversationError) as e:
        read_jsonl(p)
    assert f"{p}:3:" in str(e.value) and problem in str(e.value)
    s = LoadSummary()
    assert len(read_jsonl(p, strict=False, summary=s)) == 1 and s.skipped_invalid == 1


def test_loss_mask_covers_every_assistant_turn_only(tok):
    msgs = conv(("Hello there", "I am fine"), ("What is 12 + 30?", "It is 42"), system="be brief")
    ids, mask, truncated = render(tok, msgs, 1000)
    assert not truncated
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "I am fine<|im_end|>It is 42<|im_end|>"
    assert (ids, mask) == tuple(tok.render_chat(msgs))


def test_too_long_truncated_at_turn_or_dropped_and_counted(tok):
    long = conv(("Hello", "fine"), ("The quick brown fox jumps over the lazy dog " * 5, "ok"))
    first_len = len(tok.render_chat(long[:2])[0])
    ids, mask, truncated = render(tok, long, first_len + 3)
    assert truncated and len(ids) == first_len and tok.decode(ids).endswith("fine<|im_end|>\n")
    assert render(tok, long, first_len + 3, on_long="drop") is None
    assert render(tok, long, first_len - 1) is None  # not even the first reply fits
    enc, s = encode_conversations(tok, [long, conv(("hi", "yo")), long], first_len + 3)
    assert (s.conversations, s.truncated, s.dropped_long) == (3, 2, 0)
    enc, s = encode_conversations(tok, [long, conv(("hi", "yo"))], first_len + 3, on_long="drop")
    assert (s.conversations, s.dropped_long) == (1, 1)
    assert "1 dropped as too long" in s.line()


def test_system_prompt_added(tok, tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"messages": conv(("hi", "hello"))}) + "\n")
    enc, s = load_conversations([p], tok, 200, system="You are chatstack.")
    assert tok.decode(enc[0][0]).startswith("<|im_start|>system\nYou are chatstack.<|im_end|>")
    assert with_system(conv(("a", "b"), system="x"), "y")[0]["content"] == "x"


def test_pack_keeps_every_conversation_once(tok):
    convs = [conv(("Hello " * (i % 7 + 1), "fine " * (i % 5 + 1))) for i in range(40)]
    enc, _ = encode_conversations(tok, convs, 64)
    rows = pack(enc, 64, tok.eot_id, seed=3)
    unpacked = pack(enc, 64, tok.eot_id, packed=False)
    assert len(unpacked) == 40 and len(rows) < 40 and rows.fill() > unpacked.fill()
    got = []
    for r in range(len(rows)):
        for d in range(int(rows.doc[r].max()) + 1):
            got.append(tuple(rows.ids[r][rows.doc[r] == d].tolist()))
    assert sorted(got) == sorted(tuple(i) for i, _ in enc)
    assert int(rows.mask.sum()) == sum(sum(m) for _, m in enc)


@pytest.mark.parametrize("preset", ["nano", "nano-llama"])
def test_packed_forward_equals_separate_forwards(tok, preset):
    """Block-diagonal attention + restarting positions: a packed row computes what each conversation alone would."""
    torch.manual_seed(0)
    model = GPT(get_preset(preset, vocab_size=tok.vocab_size, block_size=128)).eval()
    convs = [conv(("Hello there", "I am fine")), conv(("hi", "It is 42"), ("ok", "fine"))]
    enc, _ = encode_conversations(tok, convs, 129)
    rows = pack(enc, 129, tok.eot_id)
    assert len(rows) == 1
    b = make_batch(rows, torch.tensor([0]))
    with torch.no_grad():
        packed = model(b["idx"], positions=b["positions"], attn_mask=b["attn_mask"])[0]
        doc = rows.doc[0, :-1][: b["idx"].size(1)]
        for d in range(2):
            sel = (doc == d).nonzero().squeeze(1)
            alone = model(b["idx"][:, sel])[0]
            torch.testing.assert_close(packed[sel], alone, atol=1e-5, rtol=1e-4)
    # targets never cross a conversation boundary and are exactly the assistant tokens
    y = b["targets"][0]
    trained = [int(t) for t in y if t >= 0]
    assert trained == [i for ids, m in enc_in_row_order(rows, enc) for i, k in zip(ids[1:], m[1:]) if k]


def enc_in_row_order(rows, enc):
    order = []
    for d in range(int(rows.doc[0].max()) + 1):
        ids = rows.ids[0][rows.doc[0] == d].tolist()
        order.append(next(e for e in enc if e[0] == ids))
    return order


def test_packed_loss_matches_mean_of_assistant_tokens(tok):
    torch.manual_seed(0)
    model = GPT(get_preset("nano", vocab_size=tok.vocab_size, block_size=128))
    enc, _ = encode_conversations(tok, [conv(("Hello", "fine")), conv(("hi", "It is 42"))], 129)
    rows = pack(enc, 129, tok.eot_id)
    assert len(rows) == 1
    b = make_batch(rows, torch.tensor([0]))
    _, loss = model(b["idx"], b["targets"], positions=b["positions"], attn_mask=b["attn_mask"])
    assert torch.isfinite(loss)
    n_trained = int((b["targets"] >= 0).sum())
    assert n_trained == sum(sum(m) for _, m in enc)
