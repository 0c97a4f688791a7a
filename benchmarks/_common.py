"""Shared helpers for the synack benchmark scripts (bench_parse, bench_explain, ...).

Import from a script in this directory with::

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as C

Helpers:

* ``ensure_dump(path, services, seed, ...)``: use a given dump, or generate
  (and cache) the deterministic kube-proxy dump from ``gen_kubeproxy``.
* ``netns()``: context manager giving a command prefix that runs a command in
  a throwaway network namespace (``ip netns add synack-bench-<pid>``, deleted
  on exit) or, if that is impossible, in ``unshare -Urn``.
* ``run_timed(cmd, ...)``: run a subprocess, return wall time, peak RSS
  (``ru_maxrss`` from ``os.wait4``, KiB) and captured output.
* ``best_of(n, fn)``: repeat a ``run_timed`` call, keep the fastest run.
* ``synack_cmd(...)``, ``iptables_restore_cmd(backend)``.
* ``Target`` / ``render_table`` / ``emit``: PASS/MISS table or JSON output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = Path(os.environ.get("SYNACK_BENCH_CACHE",
                                Path(tempfile.gettempdir()) / "synack-bench"))

if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))


# --------------------------------------------------------------------------
# input dump
# --------------------------------------------------------------------------
def _generator_fingerprint() -> str:
    src = (BENCH_DIR / "gen_kubeproxy.py").read_bytes()
    return hashlib.sha256(src).hexdigest()[:12]


def ensure_dump(path: str | os.PathLike | None = None, *, services: int = 10000,
                seed: int = 0, endpoints_per_service: int = 3, style: str = "save",
                cache_dir: Path | None = None) -> Path:
    """Return ``path`` if given (must exist), else a cached generated dump.

    The cache file name includes the generator's source hash, so editing
    ``gen_kubeproxy.py`` regenerates it.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"dump not found: {p}")
        return p
    from gen_kubeproxy import generate

    cache = Path(cache_dir or CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    name = (f"kubeproxy-{services}svc-e{endpoints_per_service}-s{seed}-{style}"
            f"-{_generator_fingerprint()}.rules")
    out = cache / name
    if not out.is_file():
        text = generate(services, seed=seed, endpoints_per_service=endpoints_per_service,
                        style=style)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return out


def count_lines(path: str | os.PathLike) -> int:
    with open(path, "rb") as fh:
        return sum(buf.count(b"\n") for buf in iter(lambda: fh.read(1 << 20), b""))


# --------------------------------------------------------------------------
# network namespace
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Sandbox:
    """How to run a command isolated from the host's netfilter state."""
    prefix: list[str]          # prepend to the command
    mode: str                  # "netns" | "unshare"
    name: str | None = None    # netns name (mode == "netns")
    note: str = ""             # human explanation (fallback reason)
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return [*self.prefix, *cmd]


def _xtables_env() -> dict[str, str]:
    # iptables-legacy takes /run/xtables.lock; point it at a private path so a
    # benchmark never contends with (or needs permission for) the host lock.
    lock = Path(tempfile.gettempdir()) / f"synack-bench-xtables-{os.getpid()}.lock"
    return {"XTABLES_LOCKFILE": str(lock)}


@contextlib.contextmanager
def netns(prefix: str = "synack-bench") -> Iterator[Sandbox]:
    """Throwaway network namespace ``<prefix>-<pid>``; deleted on exit.

    Falls back to ``unshare -Urn`` (new user+net namespace, mapped root) if
    not root or ``ip netns add`` fails; ``Sandbox.note`` says why.
    """
    env = _xtables_env()
    name = f"{prefix}-{os.getpid()}"
    reason = ""
    if os.geteuid() != 0:
        reason = "not running as root"
    elif shutil.which("ip") is None:
        reason = "'ip' not found"
    else:
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if r.returncode == 0:
            try:
                yield Sandbox(["ip", "netns", "exec", name], "netns", name=name, env=env)
            finally:
                subprocess.run(["ip", "netns", "delete", name], capture_output=True)
                with contextlib.suppress(OSError):
                    os.unlink(env["XTABLES_LOCKFILE"])
            return
        reason = f"'ip netns add {name}' failed: {r.stderr.strip() or r.returncode}"
    if shutil.which("unshare") is None:
        raise RuntimeError(f"no network namespace available ({reason}; no 'unshare')")
    try:
        yield Sandbox(["unshare", "-Urn"], "unshare",
                      note=f"{reason}; using 'unshare -Urn' instead of a named netns", env=env)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(env["XTABLES_LOCKFILE"])


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    cmd: list[str]
    seconds: float            # wall clock, spawn to reap
    maxrss_kib: int           # ru_maxrss of the child (Linux: KiB)
    returncode: int
    stdout: str
    stderr: str
    cpu_seconds: float = float("nan")  # user + sys of the child (and its reaped children)
    tree_kib: int = 0         # peak memory of the command and its descendants (run_timed tree_memory)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def maxrss_mb(self) -> float:
        return self.maxrss_kib / 1024.0


# The measuring trampoline.  Linux carries the parent's RSS high-water mark
# into a (v)forked child across exec, so a child spawned straight from this
# process would report ru_maxrss >= our own RSS (which can be hundreds of MB
# after generating a dump in-process).  A minimal interpreter (python -I -S)
# spawns the command instead and reports exit status, wall time and
# ru_maxrss through a pipe; the floor is then the trampoline's own RSS
# (~10 MB), far below anything synack uses.
_TRAMPOLINE = r"""
import os, sys, time
fd = int(sys.argv[1])
os.set_inheritable(fd, False)
argv = sys.argv[2:]
t0 = time.perf_counter()
try:
    pid = os.posix_spawnp(argv[0], argv, os.environ)
except OSError as e:
    os.write(2, ("run_timed: cannot execute %r: %s\n" % (argv[0], e)).encode())
    os.write(fd, b"127 0 0 0")
    sys.exit(0)
_, status, ru = os.wait4(pid, 0)
dt = time.perf_counter() - t0
os.write(fd, ("%d %.9f %d %.6f" % (os.waitstatus_to_exitcode(status), dt, ru.ru_maxrss,
                                   ru.ru_utime + ru.ru_stime)).encode())
"""


def _tree_memory_kib(root: int, pss: bool = False) -> int:
    """The memory of ``root`` and its descendants, from /proc: the sum of their RSS (statm: cheap;
    an upper bound, since copy-on-write pages a forked worker shares with its parent count once
    per process), or with ``pss`` the sum of their proportional set sizes (smaps_rollup: exact
    sharing, but it walks each process's page tables, which slowed a 2-CPU run by ~5 s)."""
    total, todo = 0, [root]
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    while todo:
        pid = todo.pop()
        try:
            for t in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            if pss:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    total += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
            else:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * page_kib
        except (OSError, ValueError, IndexError):
            pass
    return total


def run_timed(cmd: Sequence[str], *, stdin_path: str | os.PathLike | None = None,
              cwd: str | os.PathLike | None = None,
              env: dict[str, str] | None = None, tree_memory: bool | str = False) -> RunResult:
    """Run ``cmd``; wall time and the child's own peak RSS via ``os.wait4``.

    The command is spawned by a tiny trampoline interpreter (see above) so
    the reported peak RSS is the command's own, not inherited from this
    process.  Wall time is measured inside the trampoline from spawn to
    reap (interpreter start-up of the trampoline is excluded).
    stdout/stderr go to temporary files (no pipe back-pressure).
    ``env`` is merged over ``os.environ``. ``tree_memory``: also sample the memory of the
    command's process tree (a command that forks workers): True the summed RSS every 0.5 s, "pss"
    the summed PSS every second (slower to read), into `RunResult.tree_kib`.
    """
    full_env = {**os.environ, **(env or {})}
    with contextlib.ExitStack() as st:
        out = st.enter_context(tempfile.TemporaryFile())
        err = st.enter_context(tempfile.TemporaryFile())
        stdin = st.enter_context(open(stdin_path, "rb")) if stdin_path else subprocess.DEVNULL
        rfd, wfd = os.pipe()
        try:
            tramp = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(wfd), *cmd],
                stdin=stdin, stdout=out, stderr=err, cwd=cwd, env=full_env,
                pass_fds=(wfd,))
        finally:
            os.close(wfd)
        peak = [0]
        if tree_memory:
            import threading

            stop = threading.Event()

            def sample():
                every = 1.0 if tree_memory == "pss" else 0.5
                while not stop.wait(every):
                    peak[0] = max(peak[0], _tree_memory_kib(tramp.pid, tree_memory == "pss"))
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        with os.fdopen(rfd, "rb") as fh:
            result = fh.read().decode()
        tramp.wait()
        if tree_memory:
            stop.set()
            sampler.join()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    try:
        rc_s, secs_s, rss_s, cpu_s = result.split()
        rc, seconds, rss, cpu = int(rc_s), float(secs_s), int(rss_s), float(cpu_s)
    except ValueError:
        rc, seconds, rss, cpu = (tramp.returncode or 1), float("nan"), 0, float("nan")
        stderr += f"\nrun_timed: trampoline failed (exit {tramp.returncode})"
    return RunResult(list(cmd), seconds, rss, rc, stdout, stderr, cpu, peak[0])


def best_of(n: int, fn: Callable[[], RunResult]) -> tuple[RunResult, list[RunResult]]:
    """Call ``fn`` n times (stop at the first failure); return (fastest, all).

    Peak RSS of the returned result is the max over all runs.
    """
    runs: list[RunResult] = []
    for _ in range(max(1, n)):
        r = fn()
        runs.append(r)
        if not r.ok:
            return r, runs
    best = min(runs, key=lambda r: r.seconds)
    best = dataclasses.replace(best, maxrss_kib=max(r.maxrss_kib for r in runs))
    return best, runs


# --------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------
def synack_cmd(*args: str) -> list[str]:
    """``synack ARGS`` as ``python -m analyzer ARGS`` (run with cwd=REPO_ROOT)."""
    return [sys.executable, "-m", "analyzer", *args]


IPTABLES_RESTORE = {
    "default": "iptables-restore",
    "nft": "iptables-nft-restore",
    "legacy": "iptables-legacy-restore",
}


def iptables_restore_cmd(backend: str = "default") -> list[str]:
    exe = IPTABLES_RESTORE[backend]
    path = shutil.which(exe)
    if path is None:
        raise FileNotFoundError(f"{exe} not found")
    return [path, "--test"]


def iptables_version(backend: str = "default") -> str:
    exe = IPTABLES_RESTORE[backend].replace("-restore", "")
    if shutil.which(exe) is None:
        return "?"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return (r.stdout or r.stderr).strip()


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    name: str
    value: float | None
    limit: float
    unit: str = ""
    fmt: str = "{:.2f}"

    @property
    def ok(self) -> bool | None:
        return None if self.value is None else self.value <= self.limit

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.ok]

    def as_dict(self) -> dict:
        return {"value": self.value, "target": f"<= {self.limit:g}{self.unit}",
                "limit": self.limit, "result": self.verdict}


def render_table(rows: Sequence[tuple[str, str, str, str]],
                 header: tuple[str, str, str, str] = ("metric", "value", "target", "result")) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(c) for c in col) for col in cols]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(ln.rstrip() for ln in lines)


def emit(report: dict, text: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(text)
