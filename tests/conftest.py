"""Test-wide settings: one torch thread.

The suite's models are tiny (2 layers, 32-64 wide): with more than one thread, synchronisation costs more
than the matmuls save, and on a loaded 2-core machine threads waiting for each other made tests up to 7x
slower. Subprocesses (CLI tests, torchrun) inherit OMP_NUM_THREADS.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
