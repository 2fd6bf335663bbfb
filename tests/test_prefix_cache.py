"""Prefix caching (chatstack.infer.prefix_cache): a request that starts with a finished request's tokens reuses its
keys/values and gives the same tokens and log-probabilities as a full prefill; memory budget; weight changes.

    python -m pytest tests/test_prefix_cache.py -q
"""

import pytest
import torch
from helpers import nano_model, reference_greedy, reference_logprobs, small_tokenizer

from chatstack.infer.engine import Engine, SamplingParams
from chatstack.infer.prefix_cache import MIN_PREFIX, PrefixCache

GREEDY = dict(temperature=0.0, stop_token_ids=[])
FAMILIES = ["nano", "nano-llama"]


def _turns(tok):
    first = tok.encode("User asks, assistant answers. Then the user asks again. The quick brown fox")
    assert len(first) >= MIN_PREFIX
    return first


@pytest.mark.parametrize("family", FAMILIES)
def test_second_turn_reuses_the_first_and_matches_full_prefill(family):
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=1)
    eng = Engine(model, tok, prefix_cache_mb=16)
    sp = SamplingParams(max_new_tokens=8, logprobs=True, **GREEDY)
    p1 = _turns(tok)
    out1 = eng.generate([p1], sp)[0]
    assert eng.prefix_cache.hits == 0 and len(eng.prefix_cache.entries) == 1
    # the next turn: the history (prompt + reply) and more
    p2 = p1 + out1.token_ids + tok.encode(" To be, or not to be")
    out2 = eng.generate([p2], sp)[0]
    assert eng.prefix_cache.hits == 1
    assert eng.prefix_cache.tokens_reused == len(p1) + len(out1.token_ids) - 1  # all the first row fed
    assert out2.token_ids == reference_greedy(model, p2, 8)
    assert out2.logprobs == pytest.approx(reference_logprobs(model, p2, out2.token_ids), abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_admission_hits_and_misses_in_one_step(family):
    """Several requests admitted together, some continuing cached prefixes (of different lengths), some not;
    while another row is decoding: every row gives the reference tokens."""
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=2)
    eng = Engine(model, tok, prefix_cache_mb=16, max_batch_size=8)
    sp = SamplingParams(max_new_tokens=6, **GREEDY)
    a = _turns(tok)
    b = tok.encode("What is 12 plus 30? The answer is 42. To be, or not to be, that is the question.")
    base = eng.generate([a, b], sp)
    prompts = [
        a + base[0].token_ids + tok.encode(" again"),
        tok.encode("héllo wörld"),
        b[: MIN_PREFIX + 3] + tok.encode(" fox"),
        b + base[1].token_ids[:2],
    ]
    long_row = eng.add_request(tok.encode("The lazy dog"), SamplingParams(max_new_tokens=20, **GREEDY))
    eng.step()  # the long row is running when the others join
    rids = [eng.add_request(p, sp) for p in prompts]
    got = {}
    while eng.has_unfinished():
        for ev in eng.step():
            got.setdefault(ev.request_id, []).append(ev.token_id)
    assert eng.prefix_cache.hits == 3
    for p, rid in zip(prompts, rids):
        assert got[rid] == reference_greedy(model, p, 6)
    assert len(got[long_row]) == 19 and got[long_row] == reference_greedy(model, tok.encode("The lazy dog"), 20)[1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_hits_on_one_prefix_are_one_batched_forward(family):
    """Clients sending the same history: rows continuing the same cached prefix with remainders of different
    lengths, and identical prompts, are prefilled as one right-padded batch (identical ones copied) and give the
    reference tokens and log-probabilities."""
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=3)
    eng = Engine(model, tok, prefix_cache_mb=16, max_batch_size=8)
    sp = SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY)
    a = _turns(tok)
    hist = a + eng.generate([a], sp)[0].token_ids
    prompts = [hist + tok.encode(" again"), hist + tok.encode(" and once more"), a, a, a]
    forwards, events = [], []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: forwards.append(tuple(i[0].shape)))
    try:
        rids = [eng.add_request(p, sp) for p in prompts]
        events += eng.step()
    finally:
        hook.remove()
    assert eng.prefix_cache.hits == len(prompts)
    assert len(forwards) == 2 and forwards[0][0] == 1 and forwards[1][0] == 2  # a once (n = len(a) - 1), then both
    assert {e.request_id: e.cached_tokens for e in events} == {
        rid: len(hist if i < 2 else a) - 1 for i, rid in enumerate(rids)
    }
    while eng.has_unfinished():
        events += eng.step()
    for p, rid in zip(prompts, rids):
        ids = [e.token_id for e in events if e.request_id == rid]
        lps = [e.logprob for e in events if e.request_id == rid]
        assert ids == reference_greedy(model, p, 6)
        assert lps == pytest.approx(reference_logprobs(model, p, ids), abs=1e-4)


def test_budget_lru_and_covering_entries():
    kv = lambda n: torch.zeros(1, 2, 1, n, 4)  # 32 bytes per token
    c = PrefixCache(max_bytes=32 * 60)
    c.add(list(range(20)), kv(20))
    c.add(list(range(30)), kv(30))  # covers the first: it replaces it
    assert list(c.entries) == [tuple(range(30))] and c.bytes == 32 * 30
    c.add(list(range(100, 125)), kv(25))
    assert c.lookup(list(range(30)) + [7]) == (30, c.entries[tuple(range(30))])  # used: now most recent
    c.add(list(range(200, 220)), kv(20))  # over budget: the least recently used goes
    assert set(c.entries) == {tuple(range(30)), tuple(range(200, 220))} and c.bytes <= c.max_bytes
    assert c.lookup(list(range(10)) + [99] * 20) == (0, None)  # a match shorter than MIN_PREFIX
    assert c.lookup(list(range(30)))[0] == 29  # never the whole prompt: its last token must run
    c.add(list(range(5)), kv(5))  # too short to be worth keeping
    assert tuple(range(5)) not in c.entries


def test_weight_change_forgets_entries():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size, seed=3)
    other = nano_model("nano", tok.vocab_size, seed=4)
    eng = Engine(model, tok, prefix_cache_mb=16)
    sp = SamplingParams(max_new_tokens=5, **GREEDY)
    p1 = _turns(tok)
    out1 = eng.generate([p1], sp)[0]
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
    p2 = p1 + out1.token_ids + tok.encode(" more")
    assert eng.generate([p2], sp)[0].token_ids == reference_greedy(other, p2, 5)
    assert eng.prefix_cache.hits == 0  # the stale entry was dropped, not used


def test_chat_session_reuses_history():
    from chatstack.stages.chat import ChatSession

    tok = small_tokenizer()
    model = nano_model("nano-llama", tok.vocab_size, seed=5, block_size=256)
    eng = Engine(model, tok, prefix_cache_mb=16)
    chat = ChatSession(eng, SamplingParams(max_new_tokens=6, **GREEDY), system="You answer briefly.")
    chat.reply("The quick brown fox jumps over the lazy dog.")
    chat.reply("To be, or not to be?")
    assert eng.prefix_cache.hits == 1 and eng.prefix_cache.tokens_reused >= MIN_PREFIX
    # and the reply equals what a fresh engine gives for the same conversation
    fresh = ChatSession(Engine(model, tok), SamplingParams(max_new_tokens=6, **GREEDY), system="You answer briefly.")
    fresh.turns = chat.turns[:2]
    assert fresh.reply("To be, or not to be?") == chat.turns[-1]["content"]


def test_chunked_prefill_starts_from_a_cached_prefix():
    """A long prompt (chunked) that continues a cached one: the cached part is copied in, only the rest is run
    chunk by chunk, and the first event reports how many prompt tokens came from the cache."""
    tok = small_tokenizer()
    model = nano_model("nano-llama", tok.vocab_size, seed=6)
    eng = Engine(model, tok, prefix_cache_mb=16, prefill_chunk=4)
    p1 = _turns(tok)
    out1 = eng.generate([p1], SamplingParams(max_new_tokens=5, **GREEDY))[0]
    p2 = p1 + out1.token_ids + tok.encode(" The lazy dog sleeps.")
    n_cached = len(p1) + len(out1.token_ids) - 1
    rid = eng.add_request(p2, SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY))
    events, steps = [], 0
    while eng.has_unfinished():
        evs = eng.step()
        steps += not events
        events += evs
    assert steps == -(-(len(p2) - n_cached) // 4)  # chunks of the uncached rest only
    assert events[0].cached_tokens == n_cached and all(ev.request_id == rid for ev in events)
    assert [ev.token_id for ev in events] == reference_greedy(model, p2, 6)
    assert [ev.logprob for ev in events] == pytest.approx(
        reference_logprobs(model, p2, [ev.token_id for ev in events]), abs=1e-4
    )
