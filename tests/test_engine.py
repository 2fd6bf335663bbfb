"""Engine: KV-cache greedy decoding equals full forward passes (both model families), batching with
different prompt lengths, continuous batching, stops, seeds, logprobs, UTF-8-safe streaming, context limits.

    python -m pytest tests/test_engine.py -q
"""

import pytest
import torch
from helpers import ByteTokenizer, ScriptedLM, nano_model, reference_greedy, reference_logprobs, small_tokenizer

from chatstack.infer.engine import Engine, SamplingParams

FAMILIES = ["nano", "nano-llama"]
GREEDY = dict(temperature=0.0, stop_token_ids=[])


def _prompts(tok):
    return [
        tok.encode("The quick brown fox"),
        tok.encode("To"),
        tok.encode("What is 12 plus 30? The answer is"),
        tok.encode("héllo wörld"),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batched_equals_full_forward(family):
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size)
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 2  # really different lengths: exercises padding + masks
    out = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=12, **GREEDY))
    for p, c in zip(prompts, out):
        assert c.token_ids == reference_greedy(model, p, 12)
        assert c.finish_reason == "length"
        assert c.text == tok.decode(c.token_ids)
        assert c.prompt_ids == p


@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_join_leave_and_small_slots(family):
    """Rows join mid-generation, leave at different times, and wait for a free slot: same greedy tokens."""
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=1)
    prompts = _prompts(tok)
    lens = [5, 9, 3, 7]
    eng = Engine(model, tok, max_batch_size=2)
    rids = [eng.add_request(prompts[0], SamplingParams(max_new_tokens=lens[0], **GREEDY))]
    got = {}
    steps = 0
    while eng.has_unfinished() or len(rids) < 4:
        if steps in (2, 3, 6) and len(rids) < 4:  # late joiners; slots are only 2
            i = len(rids)
            rids.append(eng.add_request(prompts[i], SamplingParams(max_new_tokens=lens[i], **GREEDY)))
        for ev in eng.step():
            got.setdefault(ev.request_id, []).append(ev.token_id)
        assert len(eng.running) <= 2
        steps += 1
    for i, rid in enumerate(rids):
        assert got[rid] == reference_greedy(model, prompts[i], lens[i]), f"request {i}"


def test_generate_more_prompts_than_slots():
    tok = small_tokenizer()
    model = nano_model("nano-llama", tok.vocab_size, seed=2)
    prompts = _prompts(tok) * 2
    out = Engine(model, tok, max_batch_size=3).generate(prompts, SamplingParams(max_new_tokens=4, **GREEDY))
    for p, c in zip(prompts, out):
        assert c.token_ids == reference_greedy(model, p, 4)


def test_stop_token_included_in_ids_not_text():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size)
    p = tok.encode("The quick brown fox")
    ref = reference_greedy(model, p, 10)
    stop = ref[4]
    first = ref.index(stop)
    c = Engine(model, tok).generate([p], SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[stop]))[0]
    assert c.token_ids == ref[: first + 1]
    assert c.finish_reason == "stop"
    assert c.text == tok.decode(ref[:first])


def test_stop_strings_cut_text_and_stream_matches():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size, seed=3)
    p = tok.encode("To be")
    eng = Engine(model, tok)
    full = eng.generate([p], SamplingParams(max_new_tokens=30, **GREEDY))[0].text
    stop = full[10:13]
    assert stop and stop in full
    cut = full[: full.index(stop)]
    params = SamplingParams(max_new_tokens=30, stop=[stop, "\x00never"], **GREEDY)
    c = eng.generate([p], params)[0]
    assert c.finish_reason == "stop" and c.text == cut
    pieces = [ev.text for ev in eng.stream(p, params)]
    assert "".join(pieces) == cut  # held-back prefixes of a stop string are never leaked


def test_utf8_streaming_never_splits_a_character():
    text = "aé世🙂b"
    script = list(text.encode("utf-8"))  # tokens are single bytes: every character split
    tok = ByteTokenizer()
    model = ScriptedLM(script)
    eng = Engine(model, tok)
    prompt = [script[-1]]  # position 0 -> next is script[0]
    events = list(eng.stream(prompt, SamplingParams(max_new_tokens=len(script), temperature=0, stop_token_ids=[])))
    pieces = [e.text for e in events]
    assert "".join(pieces) == text
    assert all("\ufffd" not in s for s in pieces)
    assert pieces.count("") == len(script) - len(text)  # bytes that only completed a character later
    # a character cut off by max_new_tokens ends as U+FFFD in the final text, never as a crash
    c = eng.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[]))[0]
    assert c.text == "aé\ufffd" and c.finish_reason == "length"


def test_sampling_seed_reproducible_and_batch_independent():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size)
    p = tok.encode("The quick")
    eng = Engine(model, tok)
    sp = SamplingParams(max_new_tokens=15, temperature=1.0, seed=123, stop_token_ids=[])
    a = eng.generate([p], sp)[0].token_ids
    b = eng.generate([p], sp)[0].token_ids
    assert a == b
    short = SamplingParams(max_new_tokens=6, temperature=1.0, seed=123, stop_token_ids=[])
    assert eng.generate([p], short)[0].token_ids == a[:6]  # the draws don't depend on max_new_tokens
    other = SamplingParams(max_new_tokens=15, temperature=1.0, seed=7, stop_token_ids=[])
    batch = eng.generate([tok.encode("To be or"), p, p], [other, sp, other])
    assert batch[1].token_ids == a  # same seed, different batch-mates, same output
    assert batch[2].token_ids != a  # a different seed samples differently
    # per-row settings in one batch: greedy row is unaffected by a sampled neighbour
    mixed = eng.generate([p, p], [SamplingParams(max_new_tokens=8, **GREEDY), sp])
    assert mixed[0].token_ids == reference_greedy(model, p, 8)


def test_top_k_1_and_tiny_top_p_are_greedy():
    tok = small_tokenizer()
    model = nano_model("nano-llama", tok.vocab_size)
    p = tok.encode("What is")
    ref = reference_greedy(model, p, 10)
    eng = Engine(model, tok)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)):
        c = eng.generate([p], SamplingParams(max_new_tokens=10, temperature=1.3, seed=5, stop_token_ids=[], **kw))[0]
        assert c.token_ids == ref, kw


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_full_forward(family):
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size)
    prompts = [tok.encode("The quick brown fox"), tok.encode("To")]
    sp = SamplingParams(max_new_tokens=8, temperature=0.9, seed=11, stop_token_ids=[], logprobs=True, top_logprobs=3)
    for p, c in zip(prompts, Engine(model, tok).generate(prompts, sp)):
        ref = reference_logprobs(model, p, c.token_ids)
        assert c.logprobs == pytest.approx(ref, abs=1e-4)
        assert len(c.top_logprobs) == len(c.token_ids)
        for top, lp in zip(c.top_logprobs, c.logprobs):
            assert len(top) == 3
            vals = [v for _, v in top]
            assert vals == sorted(vals, reverse=True) and vals[0] >= lp - 1e-6


def test_context_length_limits():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size)  # block_size 64
    eng = Engine(model, tok)
    with pytest.raises(ValueError, match="context length 64"):
        eng.generate([[5] * 64], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="prompt 1"):
        eng.generate([[5], [5] * 70], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request([], SamplingParams())
    c = eng.generate([[5] * 60], SamplingParams(max_new_tokens=50, **GREEDY))[0]
    assert len(c.token_ids) == 4 and c.finish_reason == "length"  # stops at the context, never past it
    assert c.token_ids == reference_greedy(model, [5] * 60, 4)


def test_cancel_frees_slot_and_stream_close_cancels():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size)
    eng = Engine(model, tok, max_batch_size=1)
    a = eng.add_request(tok.encode("To be"), SamplingParams(max_new_tokens=40, **GREEDY))
    b = eng.add_request(tok.encode("What"), SamplingParams(max_new_tokens=2, **GREEDY))
    eng.step()
    assert [r.rid for r in eng.running] == [a]
    assert eng.cancel(a)
    evs = eng.step() + eng.step()
    assert [e.request_id for e in evs] == [b, b] and evs[-1].finished
    assert not eng.has_unfinished()
    it = eng.stream(tok.encode("To"), SamplingParams(max_new_tokens=40, **GREEDY))
    next(it)
    it.close()
    assert not eng.has_unfinished()


def test_chat_renders_chatml_and_invalid_params():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size)
    eng = Engine(model, tok)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    c = eng.chat(msgs, SamplingParams(max_new_tokens=5, temperature=0))
    assert c.prompt_ids == tok.render_prompt(msgs)
    assert c.token_ids == reference_greedy(model, c.prompt_ids, len(c.token_ids))[: len(c.token_ids)]
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match="invalid SamplingParams"):
            SamplingParams(**bad)


def test_training_mode_restored_and_no_dropout_while_generating():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size, dropout=0.5)
    p = tok.encode("The quick")
    ref = reference_greedy(model, p, 6)  # model is in eval mode here
    model.train()
    c = Engine(model, tok).generate([p], SamplingParams(max_new_tokens=6, **GREEDY))[0]
    assert model.training
    assert c.token_ids == ref


@pytest.mark.parametrize("transposed,fused", [(True, False), (True, True), (False, True)])
def test_engine_follows_weight_updates(transposed, fused):
    """PPO samples from the model it trains: after an optimizer step the engine must use the new weights
    (logprobs expose any stale copy: they must equal a full forward of the updated model)."""
    tok = small_tokenizer()
    model = nano_model("nano-llama", tok.vocab_size, seed=4)
    eng = Engine(model, tok, transposed_weights=transposed)
    p = tok.encode("The quick")
    sp = SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY)
    before = eng.generate([p], sp)[0]
    assert before.token_ids == reference_greedy(model, p, 6)
    # fused AdamW updates weights without bumping their version counters: generate() must still see them
    opt = (
        torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        if fused
        else torch.optim.SGD(model.parameters(), lr=5.0)
    )
    logits = model(torch.tensor([p]))
    logits[0, -1, 7].backward()  # push token 7 up
    opt.step()
    after = eng.generate([p], sp)[0]
    assert after.token_ids == reference_greedy(model, p, 6)
    assert after.logprobs == pytest.approx(reference_logprobs(model, p, after.token_ids), abs=1e-4)
    assert after.logprobs != pytest.approx(before.logprobs, abs=1e-3)


def test_weight_copies_bound_only_inside_step():
    """The engine's (in, out) weight copies live on the model's Linear modules only during step(): outside,
    the model computes (and saves) with its own weights; a load_state_dict between calls is picked up."""
    from chatstack.model import Linear

    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size, seed=6)
    other = nano_model("nano", tok.vocab_size, seed=7)
    eng = Engine(model, tok)
    p = tok.encode("The quick")
    sp = SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY)
    before = eng.generate([p], sp)[0]
    assert before.token_ids == reference_greedy(model, p, 6)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.config.n_layer + 1
    assert all("fast_weight" not in m.__dict__ and m.fast_weight is None for m in linears)
    with torch.no_grad():
        model.load_state_dict(other.state_dict())  # in place: bumps version counters
    after = eng.generate([p], sp)[0]
    assert after.token_ids == reference_greedy(other, p, 6)
    assert after.logprobs == pytest.approx(reference_logprobs(other, p, after.token_ids), abs=1e-4)
    assert after.logprobs != pytest.approx(before.logprobs, abs=1e-3)


@pytest.mark.parametrize("engine_kw", [{}, {"prefill_chunk": 4, "prefix_cache_mb": 1}])
def test_random_schedules_match_reference(engine_kw):
    """Random arrivals, cancellations, prompt lengths and slot counts: every surviving request gets exactly
    the tokens a lone full-forward greedy decode gives (exercises slot compaction and cache growth; with
    engine_kw also chunked prefill and the prefix cache)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tok = small_tokenizer()
    model = nano_model("nano-llama", tok.vocab_size, seed=5)
    cache_ref = {}

    def ref(p, n):
        key = (tuple(p), n)
        if key not in cache_ref:
            cache_ref[key] = reference_greedy(model, p, n)
        return cache_ref[key]

    req = st.tuples(
        st.lists(st.integers(0, tok.vocab_size - 1), min_size=1, max_size=12),
        st.integers(1, 6),
        st.integers(0, 5),
        st.booleans(),
    )

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(req, min_size=1, max_size=5), st.integers(1, 3))
    def check(reqs, slots):
        eng = Engine(model, tok, max_batch_size=slots, **engine_kw)
        got, rid_of, step = {}, {}, 0
        todo = sorted(enumerate(reqs), key=lambda x: x[1][2])  # by arrival step
        while todo or eng.has_unfinished():
            while todo and todo[0][1][2] <= step:
                i, (p, n, _, _) = todo.pop(0)
                rid_of[eng.add_request(p, SamplingParams(max_new_tokens=n, **GREEDY))] = i
            for ev in eng.step():
                got.setdefault(rid_of[ev.request_id], []).append(ev.token_id)
            for rid, i in list(rid_of.items()):
                if reqs[i][3] and step == reqs[i][2] + 1:  # cancel some a step after arrival
                    eng.cancel(rid)
                    got.pop(i, None)
                    del rid_of[rid]
            step += 1
        for i, (p, n, _, cancel) in enumerate(reqs):
            if not cancel:
                assert got[i] == ref(p, n)

    check()


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_prompts_prefilled_once(family):
    """A prompt admitted several times in one step (n > 1 choices, self-consistency paths) runs through the model
    once; each copy still samples on its own (seeds) and gives what it gives alone."""
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=8)
    a, b = tok.encode("The quick brown fox"), tok.encode("To be")
    params = [
        SamplingParams(max_new_tokens=7, temperature=0.9, seed=s, logprobs=True, stop_token_ids=[]) for s in range(5)
    ]
    prompts = [a, b, a, a, b]
    eng = Engine(model, tok)
    batch_rows = []
    orig = model.hidden_states
    model.hidden_states = lambda idx, **kw: (batch_rows.append(idx.shape[0]), orig(idx, **kw))[1]
    try:
        out = eng.generate(prompts, params)
    finally:
        model.hidden_states = orig
    assert batch_rows[0] == 2  # the prefill: two distinct prompts, not five rows
    for p, sp, c in zip(prompts, params, out):
        alone = Engine(model, tok).generate([p], sp)[0]
        assert c.token_ids == alone.token_ids
        assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    assert out[0].token_ids != out[2].token_ids or out[2].token_ids != out[3].token_ids  # seeds differ


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_and_keeps_others_decoding(family):
    """prefill_chunk: a long prompt is prefilled a chunk per step while a running row gets a token every step;
    its tokens and log-probabilities equal a whole prefill's."""
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=9)
    eng = Engine(model, tok, prefill_chunk=4)
    short = tok.encode("To be")
    long = tok.encode("What is 12 plus 30? The answer is 42. The quick brown fox")
    assert len(short) <= 4 < 4 * 3 < len(long)
    sp = SamplingParams(max_new_tokens=30, logprobs=True, **GREEDY)
    r_short = eng.add_request(short, sp)
    eng.step()  # the short one is running
    r_long = eng.add_request(long, SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY))
    got = {r_short: [], r_long: []}
    lps = {r_short: [], r_long: []}
    steps_until_long = 0
    while eng.has_unfinished():
        evs = eng.step()
        ids = {ev.request_id for ev in evs}
        if not got[r_long]:
            steps_until_long += 1
            assert r_short in ids or not eng.running  # never stalled by the long prefill
        for ev in evs:
            got[ev.request_id].append(ev.token_id)
            lps[ev.request_id].append(ev.logprob)
    assert steps_until_long == -(-len(long) // 4)  # one chunk per step
    assert got[r_long] == reference_greedy(model, long, 6)
    assert lps[r_long] == pytest.approx(reference_logprobs(model, long, got[r_long]), abs=1e-4)
    assert got[r_short] == reference_greedy(model, short, 30)[1:]


def test_chunked_prefill_cancel_and_invalid():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size, seed=10)
    eng = Engine(model, tok, prefill_chunk=3)
    rid = eng.add_request(tok.encode("The quick brown fox jumps"), SamplingParams(max_new_tokens=4, **GREEDY))
    eng.step()
    assert eng.prefilling and eng.has_unfinished()
    assert eng.cancel(rid) and not eng.prefilling and not eng.has_unfinished()
    p = tok.encode("The lazy dog")
    assert eng.generate([p], SamplingParams(max_new_tokens=4, **GREEDY))[0].token_ids == reference_greedy(model, p, 4)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, tok, prefill_chunk=-1)
