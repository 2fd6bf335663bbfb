"""The engine's KV memory budget: the cache grows in blocks as tokens come, never past `kv_cache_mb` (running rows,
staged prompts and the prefix cache together), preempted rows resume with the same tokens, and the memory is given
back when rows finish.

    python -m pytest tests/test_kv_budget.py -q
"""

import pytest
from helpers import nano_model, reference_greedy, small_tokenizer

from chatstack.infer.engine import Engine, SamplingParams
from chatstack.infer.kv_cache import KV_BLOCK

GREEDY = dict(temperature=0.0, stop_token_ids=[])


def _setup(block_size=256):
    tok = small_tokenizer()
    return tok, nano_model("nano-llama", tok.vocab_size, seed=3, block_size=block_size)


def _budget_mb(model, rows, positions):
    """MB for `rows` rows of `positions` positions of this model's keys and values (fp32)."""
    c = model.config
    return rows * positions * c.n_layer * 2 * c.n_kv_head * c.head_dim * 4 / 2**20


@pytest.mark.parametrize("engine_kw", [{}, {"prefill_chunk": 8, "prefix_cache_mb": 1}])
def test_budget_holds_and_preempted_rows_keep_their_tokens(engine_kw):
    tok, model = _setup()
    eng = Engine(model, tok, max_batch_size=8, kv_cache_mb=_budget_mb(model, 4, KV_BLOCK), **engine_kw)
    words = ["The quick brown fox", "To be, or not", "What is 12 plus 30?", "héllo wörld", "User asks, then"]
    prompts = [tok.encode(w) for w in words] + [tok.encode("The quick brown fox jumps over the lazy dog again")]
    n_new = [200, 180, 90, 60, 170, 100]
    rids = [eng.add_request(p, SamplingParams(max_new_tokens=n, **GREEDY)) for p, n in zip(prompts, n_new)]
    got = {rid: [] for rid in rids}
    peak = 0
    while eng.has_unfinished():
        for ev in eng.step():
            got[ev.request_id].append(ev.token_id)
        assert eng.kv_bytes() <= eng.kv_budget
        peak = max(peak, eng.cache.nbytes)
    assert eng.preemptions > 0  # the budget forced rows out and back in
    assert peak > eng.kv_budget // 2  # and the cache really used it
    for rid, p, n in zip(rids, prompts, n_new):
        assert got[rid] == reference_greedy(model, p, n)  # recomputed keys/values: the same greedy tokens
    assert eng.cache.kv is None and eng.cache.nbytes == 0  # idle: the running rows' memory is gone


def test_cache_grows_in_blocks_not_to_max_tokens():
    tok, model = _setup()
    eng = Engine(model, tok, max_batch_size=4)
    eng.add_request(tok.encode("To be"), SamplingParams(max_new_tokens=200, **GREEDY))
    lengths = []
    while eng.has_unfinished():
        eng.step()
        if eng.running:
            lengths.append(eng.cache.length)
            assert eng.cache.length <= eng.running[0].cache_len + 2 * KV_BLOCK
    assert lengths[0] <= 2 * KV_BLOCK < lengths[-1]  # started small, grew as tokens came
    assert eng.cache.kv is None


def test_prompt_beyond_the_budget_is_refused_and_a_lone_row_stops_at_it():
    tok, model = _setup()
    eng = Engine(model, tok, kv_cache_mb=_budget_mb(model, 1, KV_BLOCK))
    assert eng.max_row_len == KV_BLOCK
    with pytest.raises(ValueError, match="KV cache budget"):
        eng.add_request(list(range(1, KV_BLOCK + 1)), SamplingParams(max_new_tokens=4))
    p = tok.encode("To be")
    out = eng.generate([p], SamplingParams(max_new_tokens=200, **GREEDY))[0]
    assert out.finish_reason == "length" and len(p) + len(out.token_ids) == KV_BLOCK
    assert out.token_ids == reference_greedy(model, p, len(out.token_ids))


def test_cancel_of_the_last_row_frees_the_cache():
    tok, model = _setup()
    eng = Engine(model, tok)
    rid = eng.add_request(tok.encode("To be"), SamplingParams(max_new_tokens=100, **GREEDY))
    eng.step()
    assert eng.cache.nbytes > 0
    eng.cancel(rid)
    assert eng.cache.kv is None and not eng.has_unfinished()


def test_prefix_cache_lives_inside_the_budget():
    tok, model = _setup()
    eng = Engine(model, tok, kv_cache_mb=_budget_mb(model, 2, KV_BLOCK), prefix_cache_mb=100)
    assert eng.prefix_cache.max_bytes == eng.kv_budget  # capped at the budget
    sp = SamplingParams(max_new_tokens=40, **GREEDY)
    for w in ["The quick brown fox jumps", "To be, or not to be, that is", "What is 12 plus 30? The answer"]:
        eng.generate([tok.encode(w)], sp)
        assert eng.kv_bytes() <= eng.kv_budget
    assert eng.prefix_cache.bytes > 0
    long = tok.encode("User asks, assistant answers. Then the user asks again.")
    out = eng.generate([long], SamplingParams(max_new_tokens=60, **GREEDY))[0]  # needs the whole budget
    assert out.token_ids == reference_greedy(model, long, 60)
    assert eng.kv_bytes() <= eng.kv_budget


def test_default_budget_holds_a_full_context_row():
    tok, model = _setup()
    eng = Engine(model, tok)
    assert eng.max_row_len == model.config.block_size
    assert eng.kv_budget >= model.config.block_size * eng.cache.bytes_per_position
