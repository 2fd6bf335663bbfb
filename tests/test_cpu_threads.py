"""The thread policy (chatstack/infer/cpu.py): as many torch threads as CPUs are idle, never more than torch had
when it first ran, an explicit count wins, and it can be turned off.

    python -m pytest tests/test_cpu_threads.py -q
"""

import pytest
import torch

from chatstack.infer import cpu


@pytest.fixture
def machine(monkeypatch):
    """A 4-CPU machine whose load average the test sets; torch's thread count restored afterwards."""
    before = torch.get_num_threads()
    state = {"load": 0.0}
    monkeypatch.setattr(cpu, "available_cpus", lambda: 4)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (state["load"], 0.0, 0.0))
    monkeypatch.setattr(cpu, "_max_threads", 4)  # as if torch had 4 threads when the policy first ran
    monkeypatch.delenv("CHATSTACK_THREADS", raising=False)
    monkeypatch.delenv("CHATSTACK_THREAD_POLICY", raising=False)
    yield state
    torch.set_num_threads(before)


@pytest.mark.parametrize("load, own, want", [(0.0, 0, 4), (1.2, 0, 3), (2.6, 0, 1), (9.0, 0, 1), (5.0, 4, 3)])
def test_threads_follow_the_idle_cpus(machine, load, own, want):
    machine["load"] = load
    assert cpu.apply_thread_policy(own_busy_threads=own) == want == torch.get_num_threads()


def test_explicit_counts_win_and_the_policy_can_be_off(machine, monkeypatch):
    machine["load"] = 9.0
    assert cpu.apply_thread_policy(threads=2) == 2
    monkeypatch.setenv("CHATSTACK_THREADS", "3")
    assert cpu.apply_thread_policy() == 3
    monkeypatch.setenv("CHATSTACK_THREAD_POLICY", "0")
    torch.set_num_threads(2)
    assert cpu.apply_thread_policy() == 2  # left as it is
    monkeypatch.setenv("CHATSTACK_THREAD_POLICY", "1")
    monkeypatch.setenv("CHATSTACK_THREADS", "two")
    with pytest.raises(ValueError, match="CHATSTACK_THREADS"):
        cpu.apply_thread_policy()


def test_available_cpus_is_the_affinity_mask_at_most():
    import os

    assert 1 <= cpu.available_cpus() <= len(os.sched_getaffinity(0))
