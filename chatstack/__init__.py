"""chatstack: a from-scratch ChatGPT stack in plain PyTorch (see README.md)."""

import os

__version__ = "0.1.0"

# GNU OpenMP reads how long a waiting thread spins once, when torch loads it: set here, before any chatstack module
# imports torch. A short spin (GOMP_SPINCOUNT 10,000, tens of microseconds) still catches the next op of a decode
# step, which a sleeping thread misses (OMP_WAIT_POLICY=PASSIVE halved one-stream decode on an idle machine), and
# stops burning a core other processes need long before a scheduler time slice (chatstack/infer/cpu.py: threads)
if os.environ.get("CHATSTACK_THREAD_POLICY") != "0" and not (
    os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT")
):
    os.environ["GOMP_SPINCOUNT"] = "10000"
