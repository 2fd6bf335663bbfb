"""chatstack.infer.cpu: the oneDNN / split-bmm products equal F.linear; the backend choice; the engine with them.

python -m pytest tests/test_cpu_matmul.py -q
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import nano_model, reference_greedy, reference_logprobs, small_tokenizer

import chatstack.infer.cpu as cm
from chatstack.infer.cpu import CPUWeight, cpu_matmul_backend, onednn_linear_works
from chatstack.infer.engine import Engine, SamplingParams

needs_onednn = pytest.mark.skipif(not onednn_linear_works(), reason="this torch has no working oneDNN linear")
GREEDY = dict(temperature=0.0, stop_token_ids=[])


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("out,d_in", [(37, 24), (64, 16), (3, 8)])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_every_path_equals_f_linear(monkeypatch, out, d_in, threads, bias):
    """Rows 1 (split over the threads: a tail of out % threads rows when they don't divide; no split when out is
    too small), a few rows, many rows, 3-D input, with and without bias; small and large weights."""
    torch.manual_seed(0)
    w = torch.randn(out, d_in)
    b = torch.randn(out) if bias else None
    for small_bytes in (1 << 20, 0):  # 0: every weight counts as large (the GPT-2 path on tiny shapes)
        monkeypatch.setattr(cm, "SMALL_BYTES", small_bytes)
        for streaming in (True, False):
            cw = CPUWeight(w, streaming=streaming, threads=threads)
            split = streaming and small_bytes == 0 and out >= 2 * threads
            assert (cw.chunks is not None) == split
            if split:
                assert cw.chunks.data_ptr() == w.data_ptr()  # a view of the weight, no copy
                assert cw.main == out - out % threads
            for shape in [(1, d_in), (1, 1, d_in), (2, d_in), (5, d_in), (40, d_in), (3, 7, d_in)]:
                x = torch.randn(*shape)
                y = cw.linear(x, b)
                assert y.shape == (*shape[:-1], out)
                _close(y, F.linear(x, w, b))


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("CHATSTACK_CPU_MATMUL", raising=False)
    assert cpu_matmul_backend("mkl") == "mkl"
    with pytest.raises(ValueError, match="CHATSTACK_CPU_MATMUL='blas'"):
        cpu_matmul_backend("blas")
    monkeypatch.setenv("CHATSTACK_CPU_MATMUL", "MKL")
    assert cpu_matmul_backend() == "mkl"
    monkeypatch.setattr(cm.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cm, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu_matmul_backend("auto") == "mkl"  # Intel: MKL, as measured there (docs/benchmarks.md)
    monkeypatch.setattr(cm, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_matmul_backend("auto") == ("onednn" if onednn_linear_works() else "mkl")
    monkeypatch.setattr(cm.platform, "machine", lambda: "aarch64")
    assert cpu_matmul_backend("auto") == "mkl"  # not measured there: the default kernels
    monkeypatch.setattr(cm, "onednn_linear_works", lambda: False)
    with pytest.warns(UserWarning, match="no working oneDNN"):
        assert cpu_matmul_backend("onednn") == "mkl"


@needs_onednn
@pytest.mark.parametrize("family", ["nano", "nano-llama"])
@pytest.mark.parametrize("backend", ["onednn", "mkl"])
def test_engine_greedy_and_logprobs_match_full_forward(monkeypatch, family, backend):
    """The engine with each backend (weights forced 'large' and 'streaming', so every oneDNN path runs: prefill of
    many rows, decode of several rows, one row split over threads) still gives the full forwards' greedy tokens
    and log-probabilities, and follows an optimizer step (the packed copies are re-made)."""
    monkeypatch.setattr(cm, "SMALL_BYTES", 0)
    tok = small_tokenizer()
    model = nano_model(family, tok.vocab_size, seed=3)
    eng = Engine(model, tok, cpu_matmul=backend)
    assert eng.cpu_matmul == backend
    eng._streaming = True
    prompts = [
        tok.encode("The quick brown fox jumps over the lazy dog. " * 2),
        tok.encode("To"),
        tok.encode("What is 12 plus 30?"),
    ]
    assert len(prompts[0]) >= cm.SMALL_MAX_ROWS
    sp = SamplingParams(max_new_tokens=8, logprobs=True, **GREEDY)
    for p, c in zip(prompts, eng.generate(prompts, sp)):  # 3 rows, then fewer as none finish early
        assert c.token_ids == reference_greedy(model, p, 8)
        assert c.logprobs == pytest.approx(reference_logprobs(model, p, c.token_ids), abs=1e-4)
    one = eng.generate([prompts[2]], sp)[0]  # batch 1: the split product
    assert one.token_ids == reference_greedy(model, prompts[2], 8)
    if backend == "onednn":
        from chatstack.model import Linear

        eng._unbind_weights(eng._bind_weights())
        kinds = {type(entry[1]) for m, entry in eng._wt.items() if isinstance(m, Linear)}
        assert kinds == {CPUWeight}
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    model(torch.tensor([prompts[2]]))[0, -1, 7].backward()
    opt.step()
    after = eng.generate([prompts[2]], sp)[0]
    assert after.token_ids == reference_greedy(model, prompts[2], 8)
    assert after.logprobs == pytest.approx(reference_logprobs(model, prompts[2], after.token_ids), abs=1e-4)
