"""chatstack.infer.decode_step: the engine's module-free decode forward computes what the model's own forward does.

Two engines over one model, one with the DecodeStep and one made to call GPT.hidden_states + lm_head for every
decode step, must give the same tokens and exactly the same log-probabilities (the same kernels see the same values),
for both families, grouped keys, no biases, int8 weights, rows of different lengths joining and leaving.
tests/test_engine.py checks the engine against independent full forward passes on top of this.

    python -m pytest tests/test_decode_step.py -q
"""

import pytest
import torch
from helpers import ScriptedLM, nano_model, small_tokenizer

from chatstack.infer.decode_step import DecodeStep
from chatstack.infer.engine import Engine, SamplingParams

CASES = [
    ("nano", {}),
    ("nano", {"bias": False}),
    ("nano-llama", {}),
    ("nano-llama", {"n_kv_head": 4}),
    ("nano-llama", {"n_kv_head": 1}),
]


def _run(engine, prompts, params, join_at=2):
    """Two prompts start, the rest join at step `join_at`; returns the completions in prompt order."""
    rids = [engine.add_request(p, sp, _collect=True) for p, sp in zip(prompts[:2], params[:2])]
    steps = 0
    while engine.has_unfinished() or len(rids) < len(prompts):
        if steps == join_at:
            rids += [engine.add_request(p, sp, _collect=True) for p, sp in zip(prompts[2:], params[2:])]
        engine.step()
        steps += 1
    return [engine.done.pop(r) for r in rids]


@pytest.mark.parametrize("quantize", [None, "int8", "bf16"])
@pytest.mark.parametrize("family,over", CASES)
def test_decode_step_equals_module_forward(family, over, quantize):
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=4, **over)
    prompts = [tok.encode(t) for t in ("The quick brown fox", "To", "What is 12 plus 30?", "héllo")]
    params = [
        SamplingParams(max_new_tokens=n, temperature=t, seed=i, logprobs=True, top_logprobs=3, stop_token_ids=[])
        for i, (n, t) in enumerate([(9, 0.0), (4, 0.9), (7, 0.0), (6, 1.2)])
    ]
    fast = Engine(model, tok, quantize=quantize)
    slow = Engine(model, tok, quantize=quantize)
    assert isinstance(fast._decode_step, DecodeStep)
    calls = []
    step = fast._decode_step
    fast._decode_step = lambda *a: (calls.append(a[0].shape[0]), step(*a))[1]
    slow._decode_step = None  # every decode step through hidden_states + lm_head
    a, b = _run(fast, prompts, params), _run(slow, prompts, params)
    assert max(calls) == 4 and min(calls) < 4  # it ran, batched, while rows joined and left
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.logprobs == y.logprobs  # exact: same kernels, same values
        assert x.top_logprobs == y.top_logprobs


def test_models_that_are_not_a_gpt_use_hidden_states():
    lm = ScriptedLM([72, 105, 33])
    assert DecodeStep.for_model(lm) is None
    eng = Engine(lm, small_tokenizer())
    assert eng._decode_step is None
    out = eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[]))[0]
    assert out.token_ids == [33, 72, 105, 33]  # script[p % 3] after positions 2 (the prompt's last), 3, 4, 5


def test_decode_step_sees_weight_updates_in_place():
    """Weights are read at each call, so an in-place edit (PPO trains the model it samples from) is seen."""
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size, seed=5)
    eng = Engine(model, tok)
    sp = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True, stop_token_ids=[])
    before = eng.generate([tok.encode("abc")], sp)[0]
    with torch.no_grad():
        model.blocks[0].mlp.fc.bias.add_(0.5)
        model.norm_f.weight.mul_(1.5)
    after = eng.generate([tok.encode("abc")], sp)[0]
    ref = Engine(model, tok)
    ref._decode_step = None
    assert after.logprobs == ref.generate([tok.encode("abc")], sp)[0].logprobs
    assert after.logprobs != before.logprobs
