"""Lower-precision weights for CPU inference (chatstack.infer.quantize): int8 rounding bounds, the kernels against the
dequantised weights, and the engine's int8 decode and bf16 products against independent full-forward references.

    python -m pytest tests/test_quantize.py -q
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_checkpoint, nano_model, reference_greedy, reference_logprobs, small_tokenizer

from chatstack.cli import main
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.infer.quantize import (
    BF16Weight,
    Int8Weight,
    check_quantize,
    dequantize_int8,
    int8_supported,
    quantize_int8,
)
from chatstack.model import Linear

GREEDY = dict(temperature=0.0, stop_token_ids=[])


def test_quantize_int8_rounding_bound_and_zero_rows():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    w[3] = 0.0  # an all-zero row: scale must not be 0 (no NaN), row stays exactly 0
    w[5, 7] = 40.0  # an outlier only widens its own row's scale
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (48,)
    assert q.abs().max() <= 127
    deq = dequantize_int8(q, scale)
    err = (deq - w).abs()
    # round to nearest against the stored (bf16) scale: at most half a step per element
    assert torch.all(err <= 0.5 * scale.float()[:, None] * (1 + 1e-6))
    assert torch.all(deq[3] == 0) and torch.isfinite(deq).all()
    others = scale.float()[[i for i in range(48) if i not in (3, 5)]]
    assert scale[5].float() > 5 * others.max()
    assert (q.abs().amax(1)[torch.arange(48) != 3] >= 126).all()  # each row uses (almost) the full range


def _product(kind, shape, seed):
    """A random Linear (in = shape[-1], out = 96), an input of `shape`, the kind's weight copy and its product."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(shape[-1], 96)
    x = torch.randn(*shape)
    copy = kind(lin.weight)
    return lin, x, copy, copy.linear(x, lin.bias)


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 3, 128)])
def test_int8_linear_matches_dequantized_weight(shape):
    lin, x, w8, y = _product(Int8Weight, shape, seed=1)
    ref = F.linear(x, w8.dequantize(), lin.bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # bf16 activations and a bf16 product: ~0.3% relative error, far below int8's own rounding of weights
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2
    assert ((F.linear(x, lin.weight, lin.bias) - ref).norm() / ref.norm()).item() < 2e-2


def _mixed_reference_greedy(model, prompt, n):
    """What the engine computes with quantize="int8", by full forward passes: every Linear works row by row,
    so positions of the prompt (prefilled in fp32) take the fp32 weights and later positions (decoded) take
    int8 weights, for the Linears the kernel supports."""
    P = len(prompt)
    w8 = {
        m: Int8Weight(m.weight)
        for m in model.modules()
        if isinstance(m, Linear) and int8_supported(m.in_features, torch.device("cpu"))
    }
    orig = Linear.forward

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self in w8 and x.dim() == 3 and x.size(1) > P:
            y = y.clone()
            y[:, P:] = w8[self].linear(x[:, P:], self.bias)
        return y

    Linear.forward = forward
    try:
        return reference_greedy(model, prompt, n)
    finally:
        Linear.forward = orig


@pytest.mark.parametrize(
    "family,over", [("nano", {}), ("nano-llama", {}), ("nano", {"n_embd": 24, "n_head": 2, "ffn_hidden": 96})]
)
def test_engine_int8_decode_equals_mixed_full_forward(family, over):
    """The engine's int8 decode (batched, prompts of different lengths) equals the reference above; with a
    24-wide model the Linears reading 24 features stay fp32 while the 96-wide MLP projection is int8."""
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=2, **over)
    prompts = [tok.encode("The quick brown fox"), tok.encode("To"), tok.encode("What is 12 plus 30?")]
    eng = Engine(model, tok, quantize="int8")
    out = eng.generate(prompts, SamplingParams(max_new_tokens=10, **GREEDY))
    for p, c in zip(prompts, out):
        assert c.token_ids == _mixed_reference_greedy(model, p, 10)
    # the int8 path really ran: it differs from fp32 somewhere in the logprobs
    lp8 = eng.generate(prompts[:1], SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY))[0]
    lp32 = Engine(model, tok).generate(prompts[:1], SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY))[0]
    assert lp8.logprobs[0] == lp32.logprobs[0]  # the first token comes from the fp32 prefill
    if lp8.token_ids == lp32.token_ids:
        assert lp8.logprobs[1:] != pytest.approx(lp32.logprobs[1:], abs=1e-6)
        assert lp8.logprobs == pytest.approx(lp32.logprobs, abs=0.1)


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 3, 128), (40, 64)])
def test_bf16_linear_is_the_product_of_bf16_rounded_operands(shape):
    lin, x, _, y = _product(BF16Weight, shape, seed=3)
    # bf16 inputs and weights, fp32 sums, the product rounded to bf16, the bias added in fp32: the reference differs
    # only in summation order, so by at most one bf16 step (2^-8 relative) where the order moves a rounding
    ref = F.linear(x.bfloat16().float(), lin.weight.bfloat16().float()).bfloat16().float() + lin.bias
    assert y.shape == ref.shape and y.dtype == torch.float32
    prod = (y - lin.bias).abs()
    assert torch.all((y - ref).abs() <= prod * 2**-8 + 1e-6)
    assert (y == ref).float().mean() > 0.9
    fp32 = F.linear(x, lin.weight, lin.bias)
    assert 1e-4 < ((fp32 - ref).norm() / ref.norm()).item() < 1e-2  # bf16 rounding really happened; it is small


def _bf16_reference(model, fn, *args):
    """fn(model, *args) with every Linear computing on bf16-rounded inputs and weights, its product rounded to bf16:
    what the engine computes with quantize="bf16", by full forward passes."""
    orig = Linear.forward

    def forward(self, x):
        y = F.linear(x.bfloat16().float(), self.weight.bfloat16().float()).bfloat16().float()
        return y if self.bias is None else y + self.bias

    Linear.forward = forward
    try:
        return fn(model, *args)
    finally:
        Linear.forward = orig


@pytest.mark.parametrize("family", ["nano", "nano-llama"])
def test_engine_bf16_equals_bf16_full_forward(family):
    """Prefill and decode (batched, prompts of different lengths) on bf16 weights give the tokens and
    log-probabilities of full forward passes with bf16-rounded products, and differ from fp32's."""
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=4)
    prompts = [tok.encode("The quick brown fox"), tok.encode("To"), tok.encode("What is 12 plus 30?")]
    eng = Engine(model, tok, quantize="bf16")
    sp = SamplingParams(max_new_tokens=10, logprobs=True, **GREEDY)
    out = eng.generate(prompts, sp)
    for p, c in zip(prompts, out):
        assert c.token_ids == _bf16_reference(model, reference_greedy, p, 10)
        ref_lp = _bf16_reference(model, reference_logprobs, p, c.token_ids)
        assert c.logprobs == pytest.approx(ref_lp, abs=1e-4)
    lp32 = Engine(model, tok).generate(prompts[:1], sp)[0]
    assert out[0].logprobs[0] != pytest.approx(lp32.logprobs[0], abs=1e-6)  # the prefill ran in bf16 too


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_engine_low_precision_follows_weight_updates_and_unbinds(kind):
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size, seed=6)
    other = nano_model("nano", tok.vocab_size, seed=7)
    eng = Engine(model, tok, quantize=kind)
    ref = _mixed_reference_greedy if kind == "int8" else lambda m, p, n: _bf16_reference(m, reference_greedy, p, n)
    p = tok.encode("The quick")
    sp = SamplingParams(max_new_tokens=8, **GREEDY)
    assert eng.generate([p], sp)[0].token_ids == ref(model, p, 8)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all("fast_weight" not in m.__dict__ for m in linears)  # bound only inside a forward
    with torch.no_grad():
        model.load_state_dict(other.state_dict())  # in place: the copies must be re-made
    assert eng.generate([p], sp)[0].token_ids == ref(other, p, 8)


def test_quantize_errors_are_clear():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size)
    with pytest.raises(ValueError, match="unknown kind 'int4'.*int8"):
        Engine(model, tok, quantize="int4")
    with pytest.raises(ValueError, match="CPU"):
        check_quantize("int8", torch.device("cuda"))
    assert check_quantize("", torch.device("cpu")) is None and Engine(model, tok, quantize=None).quantize is None


def test_cli_generate_quantize_int8(tmp_path, capsys):
    path = tmp_path / "ck"
    model, tok = make_checkpoint(path, "nano", block_size=128)
    prompt = "The quick brown"
    rc = main(
        ["generate", str(path), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0", "--quantize", "int8"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    ref = _mixed_reference_greedy(model, tok.encode(prompt), 8)
    stops = {tok.eot_id, tok.im_end_id}
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    assert out == tok.decode(ref[:cut]) + "\n"
    assert main(["generate", str(path), "--prompt", prompt, "--quantize", "int4"]) == 2
    assert "unknown kind 'int4'" in capsys.readouterr().err


def test_eval_quantize_int8_decodes_with_int8(tmp_path, monkeypatch):
    """`chatstack eval --quantize int8`: the task generations go through the int8 weights, and the result says so."""
    from chatstack.stages.eval import evaluate_checkpoint, format_table

    path = tmp_path / "ck"
    make_checkpoint(path, "nano", block_size=128)
    calls = []
    orig = Int8Weight.linear
    monkeypatch.setattr(Int8Weight, "linear", lambda self, x, b: calls.append(x.shape) or orig(self, x, b))
    res = evaluate_checkpoint(str(path), ["add", "compare"], n=3, loss=False, quantize="int8")
    assert res["quantize"] == "int8" and set(res["tasks"]) == {"add", "compare"}
    # decode steps only: one position per row (the output layer gets (rows, width))
    assert calls and all(len(s) == 2 or s[1] == 1 for s in calls)
    assert "int8 decoding" in format_table(res)
    assert "quantize" not in evaluate_checkpoint(str(path), ["add"], n=2, loss=False)


def test_prepare_weights_builds_copies_up_front_and_leaves_model_untouched():
    tok = small_tokenizer()
    model = nano_model("nano", tok.vocab_size, seed=3)
    eng = Engine(model, tok, quantize="int8")
    assert eng._wt == {}
    eng.prepare_weights()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert set(eng._wt) == set(linears)
    assert all(e[1] is not None and isinstance(e[2], Int8Weight) for e in eng._wt.values())
    assert all("fast_weight" not in m.__dict__ for m in linears)
    made = {m: (e[1], e[2]) for m, e in eng._wt.items()}
    p = tok.encode("To be")
    assert eng.generate([p], SamplingParams(max_new_tokens=5, **GREEDY))[0].token_ids == _mixed_reference_greedy(
        model, p, 5
    )
    assert all(eng._wt[m][1] is a and eng._wt[m][2] is b for m, (a, b) in made.items())  # reused, not re-made
