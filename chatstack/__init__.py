"""chatstack: a from-scratch ChatGPT stack in plain PyTorch (see README.md)."""

import os

__version__ = "0.1.0"

# OpenMP reads its wait policy once, when torch loads it: set here, before any chatstack module imports torch, so
# threads that wait sleep instead of spinning on cores other processes need (chatstack/infer/cpu.py: thread policy)
if os.environ.get("CHATSTACK_THREAD_POLICY") != "0":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
