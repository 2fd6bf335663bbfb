"""chatstack.hugepages: huge-page-backed copies keep values, shape and dtype; they start on 2 MiB boundaries and
the kernel backs them with huge pages where THP is on; every fallback is plain torch.empty."""
import pytest
import torch

from chatstack import hugepages


def _huge_kb_of(t: torch.Tensor) -> int:
    """AnonHugePages (kB) of the mapping that holds t's first byte, from /proc/self/smaps."""
    addr = t.data_ptr()
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:          # a mapping's header line: "start-end perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.fixture
def fresh(monkeypatch):
    """Make the module look for madvise again (the result is cached per process), as if the environment
    did not switch it off."""
    monkeypatch.setattr(hugepages, "_madvise", None)
    monkeypatch.delenv("CHATSTACK_HUGEPAGES", raising=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_copy_keeps_values_shape_dtype(dtype):
    src = (torch.randn(1200, 900) * 50).to(dtype)           # 4.3 MB in fp32, 1.1 MB in int8 (the small path)
    t = hugepages.copy(src.t())                              # from a transposed view: a contiguous (900, 1200)
    assert t.shape == (900, 1200) and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, src.t())
    before = src.clone()
    t.zero_()                                                # writable, and its own memory
    assert torch.equal(src, before)


@pytest.mark.skipif(hugepages.thp_mode() not in ("always", "madvise"), reason="no transparent huge pages here")
def test_large_tensor_starts_on_a_huge_page_and_gets_huge_pages(fresh):
    assert hugepages.enabled()
    t = hugepages.empty((3, 1 << 20), torch.float32)         # 12 MiB
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    t.fill_(1.0)                                             # the kernel picks page sizes at first touch
    assert _huge_kb_of(t) >= 2048, "no huge page backs the region (THP defrag may be off on this machine)"
    assert t.sum().item() == 3 * (1 << 20)


def test_small_tensors_stay_plain(fresh):
    t = hugepages.empty((100, 100), torch.float32)
    assert t.shape == (100, 100) and t.untyped_storage().nbytes() == 100 * 100 * 4


def test_switched_off_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("CHATSTACK_HUGEPAGES", "0")
    assert not hugepages.enabled()
    t = hugepages.empty((1 << 20,), torch.float32)
    assert t.untyped_storage().nbytes() == 4 << 20                   # no over-allocation


def test_madvise_failure_falls_back_and_is_not_retried(monkeypatch):
    calls = []

    def failing(addr, length, advice):
        calls.append((addr, length, advice))
        return -1

    monkeypatch.setattr(hugepages, "_madvise", failing)
    t = hugepages.empty((1 << 20,), torch.float32)
    assert len(calls) == 1 and calls[0][2] == 14 and calls[0][0] % hugepages.HUGE_PAGE == 0
    assert t.shape == (1 << 20,) and t.untyped_storage().nbytes() == 4 << 20
    assert not hugepages.enabled()
    hugepages.empty((1 << 20,), torch.float32)
    assert len(calls) == 1


def test_thp_mode_parses_the_kernel_file(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(f)) == "madvise"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(hugepages.thp_mode() not in ("always", "madvise"), reason="no transparent huge pages here")
def test_engine_weight_copies_are_on_huge_pages(fresh):
    """The engine's (in, out) copies of weights of >= 2 MiB start on huge pages; int8 copies too."""
    from chatstack.engine import Engine
    from chatstack.model import GPT, GPTConfig
    from helpers_engine import ByteTokenizer

    cfg = GPTConfig(vocab_size=8192, block_size=64, n_layer=1, n_head=4, n_kv_head=4, n_embd=256, ffn_hidden=2048)
    model = GPT(cfg).eval()
    for quantize in (None, "int8"):
        eng = Engine(model, ByteTokenizer(), quantize=quantize)
        eng.prepare_weights()
        big = [e for m, e in eng._wt.items() if m.weight.numel() * 4 >= hugepages.HUGE_PAGE]
        assert big, "the test model should have weights of at least 2 MiB"
        for entry in big:
            assert entry[1].data_ptr() % hugepages.HUGE_PAGE == 0       # fp32 (in, out) copy
        if quantize:
            q8 = [e[2] for e in eng._wt.values() if e[2] is not None and e[2].q.numel() >= hugepages.HUGE_PAGE]
            assert q8 and all(q.q.data_ptr() % hugepages.HUGE_PAGE == 0 for q in q8)
