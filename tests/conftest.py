"""Test-wide settings: one torch thread.

The suite's models are tiny (2 layers, 32-64 wide): with more than one thread, synchronisation costs more
than the matmuls save, and on a loaded 2-core machine threads waiting for each other made tests up to 7x
slower. Subprocesses (CLI tests, torchrun) inherit OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def nano_ckpt(tmp_path_factory):
    """An untrained nano chat checkpoint with a tiny tokenizer (label / reward tests)."""
    from chatstack.checkpoint import save_checkpoint
    from chatstack.model import GPT
    from chatstack.presets import get_preset
    from chatstack.tokenizer import Tokenizer

    texts = ["What is 12 + 34? 46. Reverse the letters: c a t. Answer: 7"] * 3
    tok = Tokenizer.train(texts, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    cfg = get_preset("nano", vocab_size=tok.vocab_size, block_size=96)
    path = tmp_path_factory.mktemp("label") / "sft"
    save_checkpoint(path, GPT(cfg), {"stage": "sft", "model": cfg.to_dict(), "tokenizer": tok.info()}, tok)
    return path
