"""The sandbox contains what generated code may do; pass@k matches brute force over k-subsets.

python3 -m pytest -q tests/test_sandbox.py
"""

import itertools
import math
import os
import random
import sys

import pytest

from chatstack.evals.passk import mean_pass_at_k, pass_at_k
from chatstack.evals.sandbox import SandboxLimits, isolation_available, run_program

ISOLATED = isolation_available() != "rlimits-only"
needs_ns = pytest.mark.skipif(not ISOLATED, reason="no namespaces on this machine (root or user namespaces)")
FAST = SandboxLimits(wall_s=5, cpu_s=3, memory_mb=512)


# ---- pass@k -------------------------------------------------------------------------------------------
def brute_pass_at_k(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_forms_and_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(200, 101, 100) == 1.0
    # against the exact binomials where they are still representable
    n, c, k = 200, 7, 10
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    assert mean_pass_at_k([(10, 3), (10, 0)], ks=(1, 10)) == pytest.approx({"pass@1": 0.15, "pass@10": 0.5})
    assert "pass@20" not in mean_pass_at_k([(10, 3)], ks=(1, 20))
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_pass_at_k_is_the_expected_subset_success_rate():
    # Monte Carlo over random k-subsets of a fixed sample list agrees with the estimator
    rng = random.Random(0)
    samples = [1] * 4 + [0] * 16
    hits = sum(any(rng.sample(samples, 5)) for _ in range(20000)) / 20000
    assert hits == pytest.approx(pass_at_k(20, 4, 5), abs=0.02)


# ---- the sandbox --------------------------------------------------------------------------------------
def test_passing_and_failing_programs():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('fine')", FAST)
    assert ok.status == "passed" and ok.stdout.strip() == "fine"
    bad = run_program("assert 1 == 2, 'nope'", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.reason
    syntax = run_program("def f(:\n", FAST)
    assert syntax.status == "failed" and "SyntaxError" in syntax.reason


def test_infinite_loop_is_stopped():
    r = run_program("while True:\n    pass", SandboxLimits(wall_s=2, cpu_s=1))
    assert r.status in ("cpu_limit", "timeout") and not r.passed


def test_sleeping_program_hits_the_wall_clock():
    r = run_program("import time\ntime.sleep(60)", SandboxLimits(wall_s=1, cpu_s=5))
    assert r.status == "timeout"


def test_memory_hog_fails():
    r = run_program("x = bytearray(2 * 1024 ** 3)", SandboxLimits(wall_s=5, cpu_s=3, memory_mb=256))
    assert r.status == "memory_limit"


def test_output_flood_is_capped():
    r = run_program("while True:\n    print('x' * 1000)", SandboxLimits(wall_s=5, cpu_s=3, max_output_bytes=10000))
    assert r.status == "output_limit" and len(r.stdout) <= 10000


@needs_ns
def test_fork_bomb_is_contained(tmp_path):
    # without the Python guard: the OS limits alone (process count, PID namespace) must hold
    src = (
        "import os, sys\nprint(os.getcwd(), flush=True)\nwhile True:\n    try:\n        os.fork()\n"
        "    except OSError:\n        pass\n"
    )
    r = run_program(src, SandboxLimits(wall_s=2, cpu_s=2, max_processes=32, guard=False))
    assert not r.passed
    # the evaluator still forks fine, and no process of this bomb (its random working directory) survives
    assert run_program("print(7)", FAST).stdout.strip() == "7"
    workdir = r.stdout.splitlines()[0].strip()
    assert workdir.startswith("/tmp/work-")
    survivors = []
    for p in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.readlink(f"/proc/{p}/cwd") == workdir:
                survivors.append(p)
        except OSError:
            pass
    assert survivors == []


def test_os_system_is_a_failed_sample():
    r = run_program("import os\nos.system('echo hi > /tmp/x')", FAST)
    assert r.status == "failed" and "disabled" in r.reason
    r = run_program("import subprocess\nsubprocess.run(['ls'])", FAST)
    assert r.status == "failed"


@needs_ns
def test_no_network():
    src = "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=2)\n"
    r = run_program(src, FAST)
    assert r.status == "failed" and ("unreachable" in r.reason or "refused" in r.reason)
    r = run_program("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", FAST)
    assert r.status == "failed" and "unreachable" in r.reason.lower()


@needs_ns
def test_writes_outside_the_temp_dir_fail(tmp_path):
    target = tmp_path / "evil.txt"
    for path in (str(target), "/etc/chatstack-evil", os.path.join(os.getcwd(), "evil.txt")):
        r = run_program(f"open({path!r}, 'w').write('x')", SandboxLimits(wall_s=5, cpu_s=3, guard=False))
        assert r.status == "failed", path
        assert not os.path.exists(path)
    # its own working directory is writable (and thrown away)
    r = run_program("open('scratch.txt', 'w').write('x'); import os; print(os.getcwd())", FAST)
    assert r.status == "passed" and not os.path.exists(os.path.join(r.stdout.strip(), "scratch.txt"))


@needs_ns
def test_user_files_are_invisible(tmp_path):
    secret = tmp_path / "model.safetensors"
    secret.write_text("weights")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    r = run_program(f"print(open({str(secret)!r}).read())", FAST, hide=(str(tmp_path),))
    assert r.status == "failed" and "weights" not in r.stdout
    # the evaluator's working directory (the repository, runs/) is empty or absent in there
    r = run_program(f"import os; print(os.listdir({os.getcwd()!r}))", FAST)
    assert r.stdout.strip() == "[]" or "FileNotFoundError" in r.reason
    # and the Python installation still works (imports from the standard library)
    r = run_program("import json, collections; print(json.dumps(sorted(collections.Counter('aab'))))", FAST)
    assert r.status == "passed" and r.stdout.strip() == '["a", "b"]'


def test_bad_limits_raise():
    with pytest.raises(ValueError, match="wall_s"):
        run_program("pass", SandboxLimits(wall_s=0))


def test_isolation_is_reported():
    r = run_program("pass", FAST)
    assert r.isolation in ("namespaces", "user-namespaces", "rlimits-only")
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        assert r.isolation == "namespaces"


def test_limits_hold_without_namespaces():
    # the fallback where namespaces are unavailable: resource limits and the guard still contain a sample
    lim = dict(wall_s=3, cpu_s=1, memory_mb=256, namespaces=False)
    assert run_program("print(1)", SandboxLimits(**lim)).isolation == "rlimits-only"
    assert run_program("while True:\n    pass", SandboxLimits(**lim)).status in ("cpu_limit", "timeout")
    assert run_program("x = bytearray(2 * 1024 ** 3)", SandboxLimits(**lim)).status == "memory_limit"
    assert run_program("import os\nos.system('true')", SandboxLimits(**lim)).status == "failed"
