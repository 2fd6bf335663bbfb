"""The thread policy (chatstack/infer/cpu.py): as many torch threads as CPUs are idle, never more than torch had
when it first ran, an explicit count wins, and it can be turned off; importing chatstack bounds OpenMP's spin.

    python -m pytest tests/test_cpu_threads.py -q
"""

import os
import subprocess
import sys

import pytest
import torch

from chatstack.infer import cpu


@pytest.fixture
def machine(monkeypatch):
    """A 4-CPU machine whose other processes' load the test sets (state["others"]; None: no /proc/stat, and
    state["load"] is the load average); torch's thread count restored afterwards."""
    before = torch.get_num_threads()
    state = {"load": 0.0, "others": None}
    monkeypatch.setattr(cpu, "available_cpus", lambda: 4)
    monkeypatch.setattr(cpu, "others_load", lambda: state["others"])
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (state["load"], 0.0, 0.0))
    monkeypatch.setattr(cpu, "_max_threads", 4)  # as if torch had 4 threads when the policy first ran
    monkeypatch.delenv("CHATSTACK_THREADS", raising=False)
    monkeypatch.delenv("CHATSTACK_THREAD_POLICY", raising=False)
    yield state
    torch.set_num_threads(before)


@pytest.mark.parametrize("load, own, want", [(0.0, 0, 4), (1.2, 0, 3), (2.6, 0, 1), (9.0, 0, 1), (5.0, 4, 3)])
def test_without_proc_stat_threads_follow_the_load_average(machine, load, own, want):
    machine["load"] = load
    assert cpu.apply_thread_policy(own_busy_threads=own) == want == torch.get_num_threads()


@pytest.mark.parametrize("others, want", [(0.0, 4), (0.4, 4), (1.2, 3), (2.6, 1), (9.0, 1)])
def test_threads_follow_what_other_processes_use_now(machine, others, want):
    machine["load"] = 9.0  # a stale load average is ignored when the current load is known
    machine["others"] = others
    assert cpu.apply_thread_policy() == want == torch.get_num_threads()


def test_busy_cpu_seconds_reads_proc_stat_and_skips_niced_work_unless_we_are_niced():
    hz = os.sysconf("SC_CLK_TCK")
    line = "cpu  100 40 20 1000 5 1 2 3 0 0"  # user nice system idle iowait irq softirq steal guest guest_nice
    assert cpu.busy_cpu_seconds(line, count_niced=False) == pytest.approx((100 + 20 + 1 + 2 + 3) / hz)
    assert cpu.busy_cpu_seconds(line, count_niced=True) == pytest.approx((100 + 40 + 20 + 1 + 2 + 3) / hz)
    assert cpu.busy_cpu_seconds("intr 1 2 3") is None
    assert cpu.busy_cpu_seconds() is not None  # this machine has /proc/stat (Linux)


def test_others_load_subtracts_this_process_own_cpu_time(monkeypatch):
    """Over a window where the machine was busy 3.0 CPU-s and this process used 1.0 of them in 2 s, the others
    used 1 CPU; a second look within 60 s measures since the first without sleeping."""
    clock = {"t": 100.0, "busy": 50.0, "own": 10.0}
    slept = []

    def sleep(s):
        slept.append(s)
        clock.update(t=clock["t"] + 2.0, busy=clock["busy"] + 3.0, own=clock["own"] + 1.0)

    monkeypatch.setattr(cpu, "_last_look", None)
    monkeypatch.setattr(cpu, "busy_cpu_seconds", lambda: clock["busy"])
    monkeypatch.setattr(cpu.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(cpu.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(cpu.time, "sleep", sleep)
    assert cpu.others_load(window_s=1.0) == pytest.approx(1.0)
    assert slept == [1.0]
    clock.update(t=clock["t"] + 10.0, busy=clock["busy"] + 25.0, own=clock["own"] + 10.0)  # 1.5 CPUs of others
    assert cpu.others_load(window_s=1.0) == pytest.approx(1.5)
    assert slept == [1.0]  # no new window: measured since the previous look


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
    assert 1 <= cpu.available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, ("10000", None)),  # a bounded spin: not PASSIVE, which halved one-stream decode on an idle machine
        ({"OMP_WAIT_POLICY": "PASSIVE"}, (None, "PASSIVE")),  # the user's choice stands
        ({"GOMP_SPINCOUNT": "500"}, ("500", None)),
        ({"CHATSTACK_THREAD_POLICY": "0"}, (None, None)),  # the policy off: OpenMP's own defaults
    ],
)
def test_importing_chatstack_bounds_the_openmp_spin_before_torch_loads(env, want):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base.pop("CHATSTACK_THREAD_POLICY", None)
    code = (
        "import os, sys, chatstack; assert 'torch' not in sys.modules; "
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    got = tuple(None if w == "None" else w for w in out.stdout.split())
    assert got == want
