"""GPT model: both families build from flags, the KV cache reproduces a full forward pass, config errors are clear."""

import pytest
import torch
from helpers import cached_forward

from chatstack.model import GPT, GPTConfig
from chatstack.presets import PRESETS, get_preset


@pytest.mark.parametrize("preset", ["nano", "nano-llama"])
def test_kv_cache_matches_full_forward(preset):
    torch.manual_seed(0)
    m = GPT(get_preset(preset)).eval()
    x = torch.randint(0, m.config.vocab_size, (3, 24))
    with torch.no_grad():
        full = m(x)
        fwd, cache = cached_forward(m, 3, 32)
        outs = [fwd(x[:, :10]), fwd(x[:, 10:14])]  # prefill, then a chunk
        outs += [fwd(x[:, t : t + 1]) for t in range(14, 24)]  # then one token at a time
    assert cache.pos == 23
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_match_unpadded():
    """Rows of different lengths in one batch (left padding + mask + positions) give each row's own logits."""
    torch.manual_seed(0)
    m = GPT(get_preset("nano-llama")).eval()
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 5))
    pad = 4
    idx = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :pad] = False
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    mask = (causal[None] & keep[:, None, :])[:, None]  # (B, 1, T, S)
    mask[1, 0, :pad, 0] = True  # padded queries attend to something (ignored)
    positions = (keep.long().cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = m(idx, positions=positions, attn_mask=mask)
        torch.testing.assert_close(batched[0], m(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1, pad:], m(b)[0], atol=1e-5, rtol=1e-5)


def test_tied_and_untied_output():
    tied = GPT(get_preset("nano"))
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = GPT(get_preset("nano-llama"))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    m = GPT(get_preset("nano"))
    x = torch.randint(0, 512, (2, 8))
    y = x.roll(-1, 1)
    y[:, -1] = -1
    _, loss_all = m(x, y)
    mask = torch.zeros(2, 8)
    mask[:, :3] = 1
    _, loss_masked = m(x, y, loss_mask=mask)
    logits = m(x)
    ref = torch.nn.functional.cross_entropy(logits[:, :3].reshape(-1, 512), y[:, :3].reshape(-1))
    torch.testing.assert_close(loss_masked, ref)
    assert not torch.isclose(loss_all, loss_masked)


def test_context_overflow_is_an_error():
    m = GPT(get_preset("nano"))
    with pytest.raises(ValueError, match="context length"):
        m(torch.zeros(1, m.config.block_size + 1, dtype=torch.long))


def test_bad_config_names_the_problem():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"n_embd": 32, "bogus": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gpt5")


def test_every_preset_builds_a_valid_config():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0


@pytest.mark.parametrize("rows,S", [(3, 11), (8, 11), (12, 11), (12, 1400)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_grouped_decode_attention_matches_brute_force(rows, S, mask_kind):
    """decode_attention with grouped kv heads (SDPA below MATMUL_ATTENTION_ROWS rows and above
    MATMUL_ATTENTION_ROW_KEYS rows x keys, two batched products between) against attention written out per head
    over repeated keys, with keys as views into a longer cache."""
    from chatstack.model import MATMUL_ATTENTION_ROW_KEYS, MATMUL_ATTENTION_ROWS, decode_attention

    assert 3 < MATMUL_ATTENTION_ROWS <= 8 and 12 * 11 <= MATMUL_ATTENTION_ROW_KEYS < 12 * 1400  # every path runs
    g = torch.Generator().manual_seed(rows)
    H, Hkv, hd = 6, 2, 16
    kv = torch.randn(2, rows, Hkv, S + 9, hd, generator=g)
    k, v = kv[0, :, :, :S], kv[1, :, :, :S]
    q = torch.randn(rows, H, 1, hd, generator=g)
    valid = torch.ones(rows, S, dtype=torch.bool)
    valid[::2, S // 2 + 1 :] = False  # rows of different lengths
    mask = {
        "none": None,
        "bool": valid.view(rows, 1, 1, S),
        "additive": torch.zeros(rows, 1, 1, S).masked_fill(~valid.view(rows, 1, 1, S), float("-inf")),
    }[mask_kind]
    keep = valid if mask is not None else torch.ones_like(valid)
    want = torch.empty(rows, H, hd)
    for b in range(rows):
        for h in range(H):
            kh, vh = k[b, h // (H // Hkv)][keep[b]], v[b, h // (H // Hkv)][keep[b]]
            w = torch.softmax(kh @ q[b, h, 0] / hd**0.5, dim=0)
            want[b, h] = w @ vh
    got = decode_attention(q, k, v, mask)
    torch.testing.assert_close(got, want.reshape(rows, H * hd), atol=1e-5, rtol=1e-5)
