"""Kernel test harness: builds real network namespaces and replays one flow through them.

Test-support layer, outside the analyzer (standard library only): it drives `ip`, `sysctl`,
`iptables-{nft,legacy}-{restore,save}`, `conntrack`, `tcpdump`, `xtables-monitor` and small
Python socket programs inside namespaces it creates, and parses what they print.

Safety rules the harness enforces, so a test cannot touch the machine it runs on:

- every namespace is named ``synack-<pid>-<lab>-<name>``; nothing is ever created in the
  namespace the test runs in, so traffic only flows between namespaces the test created;
- interface names are generated short (``sk<n>a``/``sk<n>b``: Linux allows 15 characters);
- every command and every wait is bounded; background processes run under ``timeout`` as well,
  are tracked by PID (their own process group) and stopped with SIGTERM then SIGKILL;
- :meth:`Lab.close` (also on an exception) stops the processes, then deletes the namespaces.

A typical test::

    with Lab() as lab:
        client, server = lab.netns("client"), lab.netns("server")
        lab.veth(client, server, addr_a="10.0.0.1/24", addr_b="10.0.0.2/24")
        listener = server.listen_tcp("0.0.0.0", 8080)
        result = client.connect_tcp("10.0.0.2", 8080)
        assert result.ok and listener.connections()[0].peer[0] == "10.0.0.1"
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeVar

__all__ = [
    "BASELINE_SYSCTLS",
    "Capabilities",
    "Capture",
    "CommandError",
    "ConntrackEntry",
    "ConntrackTuple",
    "HarnessError",
    "HarnessTimeout",
    "Lab",
    "Link",
    "Ns",
    "Packet",
    "RuleCounter",
    "TcpConnection",
    "TcpResult",
    "TcpServer",
    "Trace",
    "TraceStep",
    "UdpDatagram",
    "UdpResult",
    "UdpServer",
    "Unsupported",
    "Veth",
    "parse_conntrack",
    "parse_save_counters",
    "parse_tcpdump_line",
    "parse_trace",
    "probe",
    "remove_stale_namespaces",
]

Backend = Literal["nft", "legacy"]
T = TypeVar("T")

#: Bound for one foreground command (ip, sysctl, iptables-restore, conntrack ...).
COMMAND_TIMEOUT = 5.0
#: Longest a background process (server, tcpdump, monitor) may live if nobody stops it.
DEFAULT_LIFETIME = 10.0
#: Grace between SIGTERM and SIGKILL when stopping a background process.
STOP_GRACE = 1.0

#: Applied to every new namespace so results do not depend on the host's settings.
#: IPv4 ``conf/all`` and ``conf/default`` are copied from the host's initial namespace when a
#: namespace is created (``net.core.devconf_inherit_init_net=0``), so a host with
#: ``rp_filter=1`` would silently drop asymmetric test flows; pin it off. ICMP redirects are
#: off too: a router namespace that forwards out of the interface a packet came in on (one
#: bridge, "router on a stick") would otherwise teach the client a direct route to the DNAT
#: backend, and the client's retransmissions would then bypass the router.
BASELINE_SYSCTLS: Mapping[str, int] = {
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
    "net.ipv4.conf.all.accept_redirects": 0,
    "net.ipv4.conf.default.accept_redirects": 0,
}

_IFNAMSIZ = 15
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STALE_RE = re.compile(r"^synack-(\d+)-\d+-")
_lab_numbers = itertools.count(1)
_open_labs: "weakref.WeakSet[Lab]" = weakref.WeakSet()


# --------------------------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------------------------


class HarnessError(RuntimeError):
    """The harness could not build or observe what the test asked for."""


class HarnessTimeout(HarnessError):
    """A bounded wait ran out."""


class Unsupported(HarnessError):
    """The machine lacks a tool or kernel feature (pytest maps this to a skip)."""


class CommandError(HarnessError):
    """A command failed or timed out; carries everything needed to see why."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 timed_out: bool = False) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited {returncode}"
        detail = (stderr.strip() or stdout.strip())[-2000:]
        super().__init__(f"{shlex.join(self.argv)} {what}" + (f": {detail}" if detail else ""))


def _to_text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, bounded; on timeout its whole process group is killed."""
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    except FileNotFoundError as exc:
        raise Unsupported(f"{argv[0]}: not installed") from exc
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:  # a grandchild escaped the group and holds a pipe
            proc.kill()
            stdout, stderr = "", ""
        raise CommandError(argv, None, _to_text(stdout), _to_text(stderr), timed_out=True)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stdout, stderr)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def wait_until(predicate: Callable[[], T], *, timeout: float, interval: float = 0.02,
               what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; HarnessTimeout after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessTimeout(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _family(addr: str) -> int:
    return 6 if ":" in addr else 4


def _check_ifname(name: str) -> str:
    if not name or len(name) > _IFNAMSIZ or "/" in name or " " in name:
        raise HarnessError(f"bad interface name {name!r} (1-{_IFNAMSIZ} chars, no '/' or ' ')")
    return name


# --------------------------------------------------------------------------------------------
# Background processes
# --------------------------------------------------------------------------------------------


class BackgroundProcess:
    """A process started in its own process group, bounded by ``timeout``, stopped by PID.

    The PID is not reaped before :meth:`stop`, so the process group id stays ours and
    ``killpg`` can never hit an unrelated process.
    """

    def __init__(self, argv: Sequence[str], *, name: str, workdir: str,
                 lifetime: float = DEFAULT_LIFETIME) -> None:
        self.name = name
        self.lifetime = lifetime
        self.stdout_path = os.path.join(workdir, f"{name}.out")
        self.stderr_path = os.path.join(workdir, f"{name}.err")
        # `timeout` bounds the process even if this Python process dies without cleaning up.
        self.argv = ["timeout", "-k", f"{STOP_GRACE:g}", f"{lifetime:g}", *map(str, argv)]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self._popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=err, start_new_session=True)
        self.pid = self._popen.pid
        self.returncode: int | None = None

    def running(self) -> bool:
        """True while the process has not exited (does not reap it)."""
        if self.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is None

    def wait(self, timeout: float) -> int:
        """Wait for a natural exit, bounded; returns the exit status."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() >= deadline:
                raise HarnessTimeout(f"{self.name} (pid {self.pid}) still running after {timeout}s")
            time.sleep(0.02)
        return self.stop()

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM the process group, SIGKILL it after ``grace``; idempotent."""
        if self.returncode is not None:
            return self.returncode
        if self.running():
            _killpg(self.pid, signal.SIGTERM)
            try:
                self._popen.wait(grace)
            except subprocess.TimeoutExpired:
                _killpg(self.pid, signal.SIGKILL)
                try:
                    self._popen.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
        # Anything left in the group (the child of `timeout`) dies with it; the leader is
        # still unreaped here, so the group id cannot have been reused.
        _killpg(self.pid, signal.SIGKILL)
        try:
            self.returncode = self._popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.returncode = -signal.SIGKILL
        return self.returncode

    def stdout(self) -> str:
        with open(self.stdout_path, "rb") as fh:
            return fh.read().decode(errors="replace")

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as fh:
            return fh.read().decode(errors="replace")

    def __repr__(self) -> str:
        return f"<BackgroundProcess {self.name} pid={self.pid} rc={self.returncode}>"


# --------------------------------------------------------------------------------------------
# Lab: owns namespaces, processes and a scratch directory
# --------------------------------------------------------------------------------------------


class Link(NamedTuple):
    """One interface: the namespace it lives in and its name. ``str(link)`` is the name."""

    ns: "Ns"
    name: str

    def __str__(self) -> str:
        return self.name


class Veth(NamedTuple):
    """Both ends of a veth pair; unpacks as ``a, b``."""

    a: Link
    b: Link


class Lab:
    """Context manager that owns everything a kernel test builds and removes it on exit."""

    def __init__(self, *, baseline: Mapping[str, int] = BASELINE_SYSCTLS,
                 python: str = sys.executable) -> None:
        self.prefix = f"synack-{os.getpid()}-{next(_lab_numbers)}-"
        self.baseline = dict(baseline)
        self.python = python
        self.namespaces: list[Ns] = []
        self.processes: list[BackgroundProcess] = []
        self.workdir = tempfile.mkdtemp(prefix=self.prefix)
        self._links = itertools.count(1)
        self._procs = itertools.count(1)
        self._closed = False
        _open_labs.add(self)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except HarnessError as cleanup:
            if exc_type is None:
                raise
            # Do not hide the test's own failure behind a cleanup problem.
            warnings.warn(str(cleanup), RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Stop every background process, then delete every namespace. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning; report at the end
                errors.append(f"stop {proc}: {exc}")
        for ns in reversed(self.namespaces):
            try:
                run(["ip", "netns", "delete", ns.name], check=False)
            except Exception as exc:
                errors.append(f"delete {ns.name}: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        _open_labs.discard(self)
        if errors:
            raise HarnessError("cleanup failed: " + "; ".join(errors))

    # -- building ----------------------------------------------------------------------------

    def netns(self, name: str, *, forwarding: bool = False) -> "Ns":
        """Create namespace ``synack-<pid>-<lab>-<name>`` with loopback up and the baseline
        sysctls; ``forwarding=True`` also sets ``ip_forward`` (and IPv6 forwarding)."""
        if self._closed:
            raise HarnessError("lab is closed")
        if not _NAME_RE.match(name):
            raise HarnessError(f"bad namespace name {name!r}")
        ns = Ns(self, name, self.prefix + name)
        if os.path.exists(f"/run/netns/{ns.name}"):
            # Our pid and lab number, but not ours: left by a killed process with this pid.
            run(["ip", "netns", "delete", ns.name], check=False)
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        settings = dict(self.baseline)
        if forwarding:
            settings["net.ipv4.ip_forward"] = 1
            settings["net.ipv6.conf.all.forwarding"] = 1
        if settings:
            ns.sysctl(settings)
        return ns

    def ifname(self, suffix: str = "") -> str:
        """A fresh short interface name, ``sk<n><suffix>``."""
        return _check_ifname(f"sk{next(self._links)}{suffix}")

    def veth(self, ns_a: "Ns", ns_b: "Ns", *, addr_a: str | Sequence[str] | None = None,
             addr_b: str | Sequence[str] | None = None, name_a: str | None = None,
             name_b: str | None = None, up: bool = True,
             static_neighbors: bool = False) -> Veth:
        """A veth pair from ``ns_a`` to ``ns_b`` (the two may be the same namespace).

        ``static_neighbors=True`` installs permanent ARP/ND entries for the two ends'
        addresses, so the first packet leaves at once and captures hold no ARP/ND. (On a
        fresh veth the receiving side sometimes drops the first IPv6 Neighbor Solicitation,
        so without this the first IPv6 packet can wait for the 1 s ND retransmission.)
        """
        n = next(self._links)
        name_a = _check_ifname(name_a or f"sk{n}a")
        name_b = _check_ifname(name_b or f"sk{n}b")
        ns_a.ip("link", "add", name_a, "type", "veth", "peer", "name", name_b,
                "netns", ns_b.name)
        for ns, ifname, addrs in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
            for cidr in [addrs] if isinstance(addrs, str) else (addrs or ()):
                ns.addr(ifname, cidr)
            if up:
                ns.link_up(ifname)
        if static_neighbors:
            for (ns, ifname), (peer, peer_if), addrs in (
                    ((ns_a, name_a), (ns_b, name_b), addr_b),
                    ((ns_b, name_b), (ns_a, name_a), addr_a)):
                mac = peer.mac(peer_if)
                for cidr in [addrs] if isinstance(addrs, str) else (addrs or ()):
                    ns.neigh(cidr.split("/")[0], mac, ifname)
        return Veth(Link(ns_a, name_a), Link(ns_b, name_b))

    def bridge(self, ns: "Ns", name: str = "br0", *, ports: Iterable[str | Link] = (),
               nf_call_iptables: bool, nf_call_ip6tables: bool | None = None,
               addr: str | Sequence[str] | None = None) -> Link:
        """A Linux bridge in ``ns`` with ``ports`` enslaved.

        Whether bridged IPv4 frames traverse iptables is set explicitly, both per namespace
        (``net.bridge.bridge-nf-call-iptables``, which br_netfilter creates with value 1 in
        every new namespace) and per bridge (``nf_call_iptables``): the kernel runs the hooks
        if either is 1, so both must agree for 0 to mean 0.
        """
        if nf_call_ip6tables is None:
            nf_call_ip6tables = nf_call_iptables
        _check_ifname(name)
        try:
            ns.sysctl({"net.bridge.bridge-nf-call-iptables": int(nf_call_iptables),
                       "net.bridge.bridge-nf-call-ip6tables": int(nf_call_ip6tables)})
        except CommandError as exc:
            raise Unsupported("bridge netfilter sysctls missing (br_netfilter not loaded): "
                              f"{exc}") from exc
        ns.ip("link", "add", name, "type", "bridge",
              "nf_call_iptables", str(int(nf_call_iptables)),
              "nf_call_ip6tables", str(int(nf_call_ip6tables)))
        for port in ports:
            ns.ip("link", "set", str(port), "master", name)
            ns.link_up(str(port))
        for cidr in [addr] if isinstance(addr, str) else (addr or ()):
            ns.addr(name, cidr)
        ns.link_up(name)
        return Link(ns, name)

    def spawn(self, ns: "Ns | None", argv: Sequence[str], *, name: str = "proc",
              lifetime: float = DEFAULT_LIFETIME, uid: int | None = None,
              gid: int | None = None, line_buffered: bool = False) -> BackgroundProcess:
        """Start a tracked background process (in ``ns`` if given); the lab stops it."""
        if self._closed:
            raise HarnessError("lab is closed")
        argv = list(map(str, argv))
        if line_buffered and shutil.which("stdbuf"):
            argv = ["stdbuf", "-oL", "-eL", *argv]  # stdio programs block-buffer into files
        if ns is not None:
            argv = ns.exec_argv(argv, uid=uid, gid=gid)
        proc = BackgroundProcess(argv, name=f"{next(self._procs)}-{name}",
                                 workdir=self.workdir, lifetime=lifetime)
        self.processes.append(proc)
        return proc

    def describe(self) -> str:
        """Addresses, routes, rulesets and conntrack of every namespace, for failure reports."""
        out: list[str] = []
        for ns in self.namespaces:
            out.append(f"==== {ns.name}")
            for argv in (["ip", "-br", "addr"], ["ip", "route"], ["ip", "neigh"],
                         ["iptables-nft-save", "-c"], ["iptables-legacy-save", "-c"],
                         ["conntrack", "-L"]):
                try:
                    res = ns.run(argv, check=False, timeout=2)
                    text = (res.stdout + res.stderr).strip()
                except HarnessError as exc:
                    text = str(exc)
                if text:
                    out.append(f"-- {shlex.join(argv)}\n{text}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} ns={[n.short for n in self.namespaces]}>"


@atexit.register
def _close_forgotten_labs() -> None:
    for lab in list(_open_labs):
        try:
            lab.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# Ns: one namespace
# --------------------------------------------------------------------------------------------


class Ns:
    """One network namespace created by a :class:`Lab`. ``str(ns)`` is its full name."""

    def __init__(self, lab: Lab, short: str, name: str) -> None:
        self.lab = lab
        self.short = short
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Ns {self.name}>"

    # -- running commands --------------------------------------------------------------------

    def exec_argv(self, argv: Sequence[str], *, uid: int | None = None,
                  gid: int | None = None) -> list[str]:
        """``argv`` wrapped to run in this namespace, optionally as ``uid``/``gid``."""
        argv = list(map(str, argv))
        if uid is not None or gid is not None:
            priv = ["setpriv"]
            if uid is not None:
                priv.append(f"--reuid={uid}")
            priv.append(f"--regid={gid if gid is not None else uid}")
            argv = [*priv, "--clear-groups", "--", *argv]
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, check: bool = True,
            input: str | None = None, uid: int | None = None,
            gid: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in this namespace to completion (bounded)."""
        return run(self.exec_argv(argv, uid=uid, gid=gid), timeout=timeout, check=check,
                   input=input)

    def spawn(self, argv: Sequence[str], **kwargs) -> BackgroundProcess:
        """Start a tracked background process in this namespace (see :meth:`Lab.spawn`)."""
        return self.lab.spawn(self, argv, **kwargs)

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *map(str, args)]).stdout

    def _python(self, script: str, cfg: Mapping[str, object]) -> list[str]:
        return [self.lab.python, "-c", script, json.dumps(cfg)]

    # -- links, addresses, routes, sysctls ---------------------------------------------------

    def link_up(self, ifname: str | Link) -> None:
        self.ip("link", "set", str(ifname), "up")

    def addr(self, ifname: str | Link, cidr: str) -> None:
        """Add an address; IPv6 addresses skip duplicate address detection (``nodad``) so
        they are usable at once instead of tentative for about a second."""
        extra = ["nodad"] if _family(cidr) == 6 else []
        self.ip("addr", "add", cidr, "dev", str(ifname), *extra)

    def route(self, spec: str | Sequence[str]) -> None:
        """``ip route replace <spec>``, e.g. ``ns.route('10.96.0.0/16 via 10.0.0.1')``."""
        args = shlex.split(spec) if isinstance(spec, str) else list(map(str, spec))
        family = ["-6"] if args and _family(args[0]) == 6 else []
        self.ip(*family, "route", "replace", *args)

    def mac(self, ifname: str | Link) -> str:
        return json.loads(self.ip("-j", "link", "show", "dev", str(ifname)))[0]["address"]

    def neigh(self, addr: str, lladdr: str, ifname: str | Link) -> None:
        """A permanent ARP/ND entry: ``addr`` is at ``lladdr`` on ``ifname``."""
        self.ip("neigh", "replace", addr, "lladdr", lladdr, "dev", str(ifname),
                "nud", "permanent")

    def sysctl(self, key: str | Mapping[str, object], value: object = None) -> None:
        """Set one sysctl (``ns.sysctl('net.ipv4.ip_forward', 1)``) or several (a mapping)."""
        settings = {key: value} if isinstance(key, str) else dict(key)
        if any(v is None for v in settings.values()):
            raise HarnessError("sysctl needs a value")
        self.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])

    def sysctl_get(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    def links(self) -> list[str]:
        return [line.split()[0].split("@")[0] for line in self.ip("-br", "link").splitlines()
                if line.strip()]

    # -- iptables ----------------------------------------------------------------------------

    @staticmethod
    def _xtables(backend: Backend, ipv6: bool, suffix: str = "") -> str:
        if backend not in ("nft", "legacy"):
            raise HarnessError(f"unknown iptables backend {backend!r} (nft or legacy)")
        return f"{'ip6' if ipv6 else 'ip'}tables-{backend}{suffix}"

    def iptables(self, args: str | Sequence[str], *, backend: Backend = "nft",
                 ipv6: bool = False) -> str:
        """One iptables command, e.g. ``ns.iptables('-t nat -S')``; returns stdout."""
        argv = shlex.split(args) if isinstance(args, str) else list(map(str, args))
        return self.run([self._xtables(backend, ipv6), "-w", "5", *argv]).stdout

    def iptables_restore(self, text: str, *, backend: Backend = "nft", ipv6: bool = False,
                         flush: bool = True) -> None:
        """Load an ``iptables-save`` style ruleset; ``flush=False`` is ``--noflush``."""
        argv = [self._xtables(backend, ipv6, "-restore"), "-w", "5"]
        if not flush:
            argv.append("--noflush")
        if not text.endswith("\n"):
            text += "\n"
        self.run(argv, input=text)

    def iptables_save(self, *, table: str | None = None, counters: bool = False,
                      backend: Backend = "nft", ipv6: bool = False) -> str:
        argv = [self._xtables(backend, ipv6, "-save")]
        if counters:
            argv.append("-c")
        if table:
            argv += ["-t", table]
        return self.run(argv).stdout

    def counted_rules(self, table: str, *, backend: Backend = "nft",
                      ipv6: bool = False) -> list["RuleCounter"]:
        """Every rule of ``table`` with its counters, in evaluation order."""
        text = self.iptables_save(table=table, counters=True, backend=backend, ipv6=ipv6)
        return [r for r in parse_save_counters(text) if r.table == table]

    def rule_counters(self, table: str, *, backend: Backend = "nft",
                      ipv6: bool = False) -> dict[tuple[str, int], int]:
        """``{(chain, rule number from 1): packets}`` for ``table``."""
        return {(r.chain, r.index): r.packets
                for r in self.counted_rules(table, backend=backend, ipv6=ipv6)}

    # -- conntrack ---------------------------------------------------------------------------

    def conntrack(self, *, family: Literal["ipv4", "ipv6"] = "ipv4",
                  proto: str | None = None) -> list["ConntrackEntry"]:
        """This namespace's conntrack table (conntrack is per namespace).

        A namespace tracks connections only once something needs it (a nat rule, a
        ``conntrack``/``state`` match, br_netfilter...); before that the list is empty.
        """
        argv = ["conntrack", "-L", "-f", family]
        if proto:
            argv += ["-p", proto]
        return parse_conntrack(self.run(argv).stdout)

    def conntrack_flush(self) -> None:
        self.run(["conntrack", "-F"], check=False)

    # -- sockets -----------------------------------------------------------------------------

    def listen_tcp(self, addr: str = "0.0.0.0", port: int = 8080, *, echo: bool = True,
                   lifetime: float = DEFAULT_LIFETIME, io_timeout: float = 2.0,
                   uid: int | None = None, gid: int | None = None,
                   ready_timeout: float = 3.0) -> "TcpServer":
        """Start a bounded TCP server; returns once it listens.

        For every connection it records the peer it saw, the local address the connection
        arrived at and, when conntrack knows the connection, the original destination
        (``SO_ORIGINAL_DST``: the address before DNAT/REDIRECT), then echoes what it reads.
        ``uid``/``gid`` drop privileges before the socket is created, so the socket belongs
        to that user (what ``-m owner`` matches on).
        """
        server = TcpServer(self, addr, port, echo=echo, lifetime=lifetime,
                           io_timeout=io_timeout, uid=uid, gid=gid)
        server.wait_ready(ready_timeout)
        return server

    def listen_udp(self, addr: str = "0.0.0.0", port: int = 5353, *, echo: bool = True,
                   lifetime: float = DEFAULT_LIFETIME, uid: int | None = None,
                   gid: int | None = None, ready_timeout: float = 3.0) -> "UdpServer":
        """Start a bounded UDP server that records each datagram's peer and the destination
        address it arrived with (``IP_PKTINFO``), echoing it back if ``echo``."""
        server = UdpServer(self, addr, port, echo=echo, lifetime=lifetime, uid=uid, gid=gid)
        server.wait_ready(ready_timeout)
        return server

    def connect_tcp(self, dst: str, port: int, *, src: str | None = None,
                    src_port: int | None = None, data: bytes | None = b"hi",
                    timeout: float = 2.0, uid: int | None = None,
                    gid: int | None = None) -> "TcpResult":
        """Connect from this namespace, send ``data``, half-close, read until EOF.

        ``timeout`` bounds the connect and, separately, the read. A SYN answered by a
        SYN+ACK from an address the client never dialled does not complete the connect:
        the client's kernel resets it and retransmits, so the outcome is ``timeout``.
        """
        cfg = {"dst": dst, "port": port, "src": src, "src_port": src_port,
               "data": None if data is None else data.hex(), "timeout": timeout,
               "uid": uid, "gid": gid}
        res = self.run(self._python(_TCP_CLIENT, cfg), timeout=2 * timeout + 5)
        return TcpResult.from_json(_last_json_line(res.stdout, res))

    def send_udp(self, dst: str, port: int, data: bytes = b"hi", *, src: str | None = None,
                 src_port: int | None = None, timeout: float = 1.0,
                 uid: int | None = None, gid: int | None = None) -> "UdpResult":
        """Send one datagram and wait up to ``timeout`` for one reply."""
        cfg = {"dst": dst, "port": port, "src": src, "src_port": src_port,
               "data": data.hex(), "timeout": timeout, "uid": uid, "gid": gid}
        res = self.run(self._python(_UDP_CLIENT, cfg), timeout=timeout + 5)
        return UdpResult.from_json(_last_json_line(res.stdout, res))

    # -- observing ---------------------------------------------------------------------------

    def capture(self, ifname: str | Link = "any", filter: str = "", *, count: int | None = None,
                timeout: float = 5.0, settle: float = 0.2) -> "Capture":
        """``with ns.capture('sk1a', 'tcp port 80') as cap: ...`` then ``cap.packets``."""
        return Capture(self, str(ifname), filter, count=count, timeout=timeout, settle=settle)

    def trace(self, match: str = "-p tcp", *, ipv6: bool = False, timeout: float = 5.0,
              settle: float = 0.2) -> "Trace":
        """``xtables-monitor --trace`` while ``-j TRACE`` rules matching ``match`` sit first
        in raw PREROUTING and OUTPUT (nft backend only). Enter it after loading rules: an
        ``iptables-restore`` of the raw table would flush the TRACE rules."""
        return Trace(self, match, ipv6=ipv6, timeout=timeout, settle=settle)


def _last_json_line(stdout: str, res: subprocess.CompletedProcess[str]) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise HarnessError(f"no result from {shlex.join(res.args)}: {res.stderr.strip()[-2000:]}")


# --------------------------------------------------------------------------------------------
# Socket programs (run with the lab's Python inside the namespace)
# --------------------------------------------------------------------------------------------

# Shared prologue: configuration, privilege drop, address family.
_PROLOGUE = r"""
import errno, json, os, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
def drop_privileges():
    uid, gid = cfg.get("uid"), cfg.get("gid")
    if gid is None:
        gid = uid
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
def family(addr):
    return socket.AF_INET6 if addr and ":" in addr else socket.AF_INET
def addr_of(sa):
    return [sa[0], sa[1]] if sa else None
def err_name(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
"""

_TCP_SERVER = _PROLOGUE + r"""
log = open(cfg["log"], "a", buffering=1)
def emit(**kw):
    kw["t"] = time.time()
    log.write(json.dumps(kw) + "\n")
def original_dst(conn, fam):
    # SO_ORIGINAL_DST (80): the destination before DNAT/REDIRECT, from conntrack.
    try:
        if fam == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
            return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
        raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]]
    except OSError:
        return None
drop_privileges()
fam = family(cfg["addr"])
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((cfg["addr"], cfg["port"]))
srv.listen(16)
emit(event="listening", local=addr_of(srv.getsockname()), pid=os.getpid(), uid=os.getuid())
deadline = time.monotonic() + cfg["lifetime"]
n = 0
while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        break
    srv.settimeout(remaining)
    try:
        conn, peer = srv.accept()
    except socket.timeout:
        break
    n += 1
    emit(event="accept", id=n, peer=addr_of(peer), local=addr_of(conn.getsockname()),
         original_dst=original_dst(conn, fam))
    conn.settimeout(max(0.05, min(cfg["io_timeout"], deadline - time.monotonic())))
    data, error = b"", None
    try:
        while len(data) < 1 << 20:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            if cfg["echo"]:
                conn.sendall(chunk)
    except socket.timeout:
        error = "timeout"
    except OSError as exc:
        error = err_name(exc)
    emit(event="done", id=n, data=data.hex(), error=error)
    conn.close()
emit(event="exit")
"""

_UDP_SERVER = _PROLOGUE + r"""
log = open(cfg["log"], "a", buffering=1)
def emit(**kw):
    kw["t"] = time.time()
    log.write(json.dumps(kw) + "\n")
drop_privileges()
fam = family(cfg["addr"])
srv = socket.socket(fam, socket.SOCK_DGRAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if fam == socket.AF_INET:
    srv.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO
else:
    srv.setsockopt(socket.IPPROTO_IPV6, 49, 1)  # IPV6_RECVPKTINFO
srv.bind((cfg["addr"], cfg["port"]))
port = srv.getsockname()[1]
emit(event="listening", local=addr_of(srv.getsockname()), pid=os.getpid(), uid=os.getuid())
deadline = time.monotonic() + cfg["lifetime"]
while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        break
    srv.settimeout(remaining)
    try:
        data, anc, _flags, peer = srv.recvmsg(65535, 256)
    except socket.timeout:
        break
    local, ifindex = None, None
    for level, kind, raw in anc:
        if level == socket.IPPROTO_IP and kind == 8:  # struct in_pktinfo
            ifindex = struct.unpack("i", raw[:4])[0]
            local = [socket.inet_ntop(socket.AF_INET, raw[8:12]), port]
        elif level == socket.IPPROTO_IPV6 and kind == 50:  # struct in6_pktinfo
            local = [socket.inet_ntop(socket.AF_INET6, raw[:16]), port]
            ifindex = struct.unpack("i", raw[16:20])[0]
    emit(event="datagram", peer=addr_of(peer), local=local, ifindex=ifindex, data=data.hex())
    if cfg["echo"]:
        try:
            srv.sendto(data, peer)
        except OSError as exc:
            emit(event="echo-error", error=err_name(exc))
emit(event="exit")
"""

_TCP_CLIENT = _PROLOGUE + r"""
drop_privileges()
fam = family(cfg["dst"])
res = {"outcome": None, "connected": False, "error": None, "local": None, "peer": None,
       "received": "", "elapsed": None}
sock = socket.socket(fam, socket.SOCK_STREAM)
if cfg["src"] or cfg["src_port"]:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg["src"] or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), cfg["src_port"] or 0))
sock.settimeout(cfg["timeout"])
t0 = time.monotonic()
try:
    sock.connect((cfg["dst"], cfg["port"]))
except socket.timeout:
    res["outcome"] = "timeout"
except ConnectionRefusedError:
    res["outcome"], res["error"] = "refused", "ECONNREFUSED"
except OSError as exc:
    res["error"] = err_name(exc)
    unreachable = (errno.EHOSTUNREACH, errno.ENETUNREACH)
    res["outcome"] = "unreachable" if exc.errno in unreachable else "error"
else:
    res["connected"] = True
    res["peer"] = addr_of(sock.getpeername())
    received = b""
    try:
        if cfg["data"] is not None:
            sock.sendall(bytes.fromhex(cfg["data"]))
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        res["outcome"] = "ok"
    except socket.timeout:
        res["outcome"] = "timeout"
    except (ConnectionResetError, BrokenPipeError) as exc:
        res["outcome"], res["error"] = "reset", err_name(exc)
    except OSError as exc:
        res["outcome"], res["error"] = "error", err_name(exc)
    res["received"] = received.hex()
try:
    res["local"] = addr_of(sock.getsockname())  # the ephemeral port, even after a failure
except OSError:
    pass
res["elapsed"] = time.monotonic() - t0
sock.close()
print(json.dumps(res))
"""

_UDP_CLIENT = _PROLOGUE + r"""
drop_privileges()
fam = family(cfg["dst"])
res = {"sent": False, "error": None, "local": None, "reply": None, "reply_from": None}
sock = socket.socket(fam, socket.SOCK_DGRAM)
if cfg["src"] or cfg["src_port"]:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg["src"] or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), cfg["src_port"] or 0))
sock.settimeout(cfg["timeout"])
try:
    sock.sendto(bytes.fromhex(cfg["data"]), (cfg["dst"], cfg["port"]))
    res["sent"] = True
    res["local"] = addr_of(sock.getsockname())
    data, peer = sock.recvfrom(65535)
    res["reply"], res["reply_from"] = data.hex(), addr_of(peer)
except socket.timeout:
    pass
except OSError as exc:
    res["error"] = err_name(exc)  # e.g. ECONNREFUSED: an ICMP port unreachable came back
print(json.dumps(res))
"""


def _addr(value: object) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if value else None  # type: ignore[index]


@dataclass(frozen=True, slots=True)
class TcpResult:
    """What a TCP client saw. ``outcome`` is one of ``ok`` (connected, sent, read to EOF),
    ``refused`` (RST to the SYN), ``reset`` (RST after the handshake), ``timeout``,
    ``unreachable`` (ICMP) or ``error``."""

    outcome: str
    connected: bool
    error: str | None
    local: tuple[str, int] | None
    peer: tuple[str, int] | None
    received: bytes
    elapsed: float

    @classmethod
    def from_json(cls, d: Mapping) -> "TcpResult":
        return cls(d["outcome"], bool(d["connected"]), d["error"], _addr(d["local"]),
                   _addr(d["peer"]), bytes.fromhex(d["received"] or ""), float(d["elapsed"]))

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def reset(self) -> bool:
        return self.outcome in ("refused", "reset")

    @property
    def timed_out(self) -> bool:
        return self.outcome == "timeout"


@dataclass(frozen=True, slots=True)
class UdpResult:
    sent: bool
    error: str | None
    local: tuple[str, int] | None
    reply: bytes | None
    reply_from: tuple[str, int] | None

    @classmethod
    def from_json(cls, d: Mapping) -> "UdpResult":
        reply = d["reply"]
        return cls(bool(d["sent"]), d["error"], _addr(d["local"]),
                   None if reply is None else bytes.fromhex(reply), _addr(d["reply_from"]))

    @property
    def replied(self) -> bool:
        return self.reply is not None


@dataclass(frozen=True, slots=True)
class TcpConnection:
    """One connection as the server saw it. ``data`` is None until the server finished it."""

    id: int
    peer: tuple[str, int]
    local: tuple[str, int]
    original_dst: tuple[str, int] | None
    data: bytes | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    peer: tuple[str, int]
    local: tuple[str, int] | None
    ifindex: int | None
    data: bytes


class _Server:
    """Common part of the socket servers: a tracked process writing JSON lines."""

    _script = ""

    def __init__(self, ns: Ns, addr: str, port: int, *, lifetime: float,
                 uid: int | None, gid: int | None, **extra: object) -> None:
        self.ns = ns
        self.addr = addr
        self.port = port
        kind = type(self).__name__.lower()
        self.log_path = os.path.join(ns.lab.workdir, f"{ns.short}-{kind}-{port}-"
                                     f"{next(ns.lab._procs)}.jsonl")
        open(self.log_path, "w").close()  # exists and is ours before privileges are dropped
        os.chmod(self.log_path, 0o666)
        cfg = {"addr": addr, "port": port, "lifetime": lifetime, "uid": uid, "gid": gid,
               "log": self.log_path, **extra}
        # The interpreter is exec'd as root; the script drops to uid/gid itself (a
        # setpriv'd exec could not even read a Python that lives under /root).
        self.process = ns.spawn(ns._python(self._script, cfg), name=f"{ns.short}-{kind}",
                                lifetime=lifetime + 2)

    def events(self) -> list[dict]:
        out = []
        with open(self.log_path, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):  # a partial last line is still being written
                    out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if any(e["event"] == "listening" for e in self.events()):
                return True
            if not self.process.running():
                raise HarnessError(f"{type(self).__name__} on {self.addr}:{self.port} in "
                                   f"{self.ns.name} died: {self.process.stderr().strip()}")
            return False
        wait_until(ready, timeout=timeout, what=f"{self.ns.short} to listen on {self.port}")

    def stop(self) -> None:
        self.process.stop()


class TcpServer(_Server):
    _script = _TCP_SERVER

    def __init__(self, ns: Ns, addr: str, port: int, *, echo: bool, io_timeout: float,
                 **kw) -> None:
        super().__init__(ns, addr, port, echo=echo, io_timeout=io_timeout, **kw)

    def connections(self) -> list[TcpConnection]:
        """Connections accepted so far, in order."""
        conns: dict[int, TcpConnection] = {}
        for e in self.events():
            if e["event"] == "accept":
                conns[e["id"]] = TcpConnection(e["id"], _addr(e["peer"]), _addr(e["local"]),
                                               _addr(e["original_dst"]))
            elif e["event"] == "done" and e["id"] in conns:
                c = conns[e["id"]]
                conns[e["id"]] = TcpConnection(c.id, c.peer, c.local, c.original_dst,
                                               bytes.fromhex(e["data"]), e["error"])
        return list(conns.values())

    def wait_connections(self, n: int = 1, *, timeout: float = 3.0,
                         finished: bool = True) -> list[TcpConnection]:
        """Wait until ``n`` connections were accepted (and, if ``finished``, read to EOF)."""
        def enough() -> list[TcpConnection] | None:
            conns = [c for c in self.connections() if c.data is not None or not finished]
            return conns if len(conns) >= n else None
        return wait_until(enough, timeout=timeout, what=f"{n} connection(s) on {self.port}")


class UdpServer(_Server):
    _script = _UDP_SERVER

    def __init__(self, ns: Ns, addr: str, port: int, *, echo: bool, **kw) -> None:
        super().__init__(ns, addr, port, echo=echo, **kw)

    def datagrams(self) -> list[UdpDatagram]:
        return [UdpDatagram(_addr(e["peer"]), _addr(e["local"]), e["ifindex"],
                            bytes.fromhex(e["data"]))
                for e in self.events() if e["event"] == "datagram"]

    def wait_datagrams(self, n: int = 1, *, timeout: float = 3.0) -> list[UdpDatagram]:
        def enough() -> list[UdpDatagram] | None:
            got = self.datagrams()
            return got if len(got) >= n else None
        return wait_until(enough, timeout=timeout, what=f"{n} datagram(s) on {self.port}")


# --------------------------------------------------------------------------------------------
# iptables-save -c
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleCounter:
    """One rule of ``iptables-save -c``; ``index`` counts from 1 within its chain, as
    ``iptables -L --line-numbers`` does."""

    table: str
    chain: str
    index: int
    packets: int
    bytes: int
    rule: str


_COUNTED_RULE = re.compile(r"^\[(\d+):(\d+)\]\s+(-A\s+(\S+).*)$")


def parse_save_counters(text: str) -> list[RuleCounter]:
    """Rules and counters from ``iptables-save -c`` output.

    >>> text = '''*nat
    ... :PREROUTING ACCEPT [0:0]
    ... [3:180] -A PREROUTING -d 10.96.0.10/32 -p tcp -j KUBE-SVC
    ... [1:60] -A PREROUTING -j DNAT --to-destination 10.0.2.2:8080
    ... COMMIT'''
    >>> [(r.chain, r.index, r.packets) for r in parse_save_counters(text)]
    [('PREROUTING', 1, 3), ('PREROUTING', 2, 1)]
    """
    rules: list[RuleCounter] = []
    table = ""
    seen: dict[tuple[str, str], int] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
            continue
        m = _COUNTED_RULE.match(line)
        if not m:
            continue
        chain = m.group(4)
        index = seen.get((table, chain), 0) + 1
        seen[(table, chain)] = index
        rules.append(RuleCounter(table, chain, index, int(m.group(1)), int(m.group(2)),
                                 m.group(3)))
    return rules


# --------------------------------------------------------------------------------------------
# conntrack -L
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConntrackTuple:
    """One direction of a conntrack entry. Ports are None for protocols without them."""

    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        def ep(a: str, p: int | None) -> str:
            return a if p is None else (f"[{a}]:{p}" if ":" in a else f"{a}:{p}")
        return f"{ep(self.src, self.sport)} -> {ep(self.dst, self.dport)}"


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    proto: str
    protonum: int
    timeout: int
    state: str | None
    original: ConntrackTuple
    reply: ConntrackTuple
    flags: frozenset[str]
    attrs: tuple[tuple[str, str], ...]
    raw: str

    @property
    def dnat(self) -> bool:
        """The reply comes from somewhere other than where the original went."""
        return (self.reply.src, self.reply.sport) != (self.original.dst, self.original.dport)

    @property
    def snat(self) -> bool:
        return (self.reply.dst, self.reply.dport) != (self.original.src, self.original.sport)

    @property
    def unreplied(self) -> bool:
        return "UNREPLIED" in self.flags


def _tuple(kv: dict[str, str]) -> ConntrackTuple:
    port = lambda k: int(kv[k]) if k in kv else None  # noqa: E731
    extra = tuple((k, v) for k, v in kv.items() if k not in ("src", "dst", "sport", "dport"))
    return ConntrackTuple(kv.get("src", ""), kv.get("dst", ""), port("sport"), port("dport"),
                          extra)


def parse_conntrack(text: str) -> list[ConntrackEntry]:
    """Entries from ``conntrack -L`` (plain or ``-o extended``) output.

    >>> line = ('tcp      6 117 SYN_SENT src=10.0.0.2 dst=10.96.0.10 sport=40000 dport=80 '
    ...         '[UNREPLIED] src=10.0.0.3 dst=10.0.0.2 sport=8080 dport=40000 mark=0 use=1')
    >>> e = parse_conntrack(line)[0]
    >>> str(e.original), str(e.reply), e.state, e.unreplied, e.dnat
    ('10.0.0.2:40000 -> 10.96.0.10:80', '10.0.0.3:8080 -> 10.0.0.2:40000', 'SYN_SENT', True, True)
    """
    entries: list[ConntrackEntry] = []
    for raw in text.splitlines():
        tokens = raw.split()
        if len(tokens) < 4 or tokens[0] == "conntrack":
            continue
        if tokens[0] in ("ipv4", "ipv6"):  # -o extended prefixes the layer-3 family
            tokens = tokens[2:]
        try:
            proto, protonum, timeout = tokens[0], int(tokens[1]), int(tokens[2])
        except (ValueError, IndexError):
            continue
        rest = tokens[3:]
        state = None
        if rest and "=" not in rest[0] and not rest[0].startswith("["):
            state, rest = rest[0], rest[1:]
        dirs: list[dict[str, str]] = [{}, {}]
        attrs: list[tuple[str, str]] = []
        flags: set[str] = set()
        direction = -1
        for tok in rest:
            if tok.startswith("[") and tok.endswith("]"):
                flags.add(tok[1:-1])
                continue
            key, sep, value = tok.partition("=")
            if not sep:
                continue
            if key == "src":
                direction += 1
            if 0 <= direction <= 1 and key in ("src", "dst", "sport", "dport", "type", "code",
                                                "id", "packets", "bytes") \
                    and key not in dirs[direction]:
                dirs[direction][key] = value
            else:
                attrs.append((key, value))
        entries.append(ConntrackEntry(proto, protonum, timeout, state, _tuple(dirs[0]),
                                      _tuple(dirs[1]), frozenset(flags), tuple(attrs), raw))
    return entries


# --------------------------------------------------------------------------------------------
# tcpdump
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    """One line of ``tcpdump -nn -tt``. ``flags`` is tcpdump's TCP flag string (``S``, ``S.``,
    ``R``, ``R.``, ``P.``, ``F.``...), empty for other protocols."""

    time: float
    ifname: str | None
    direction: str | None
    src: str
    sport: int | None
    dst: str
    dport: int | None
    proto: str
    flags: str
    raw: str

    @property
    def is_syn(self) -> bool:
        return self.proto == "tcp" and "S" in self.flags and "." not in self.flags

    @property
    def is_synack(self) -> bool:
        return self.proto == "tcp" and "S" in self.flags and "." in self.flags

    @property
    def is_rst(self) -> bool:
        return self.proto == "tcp" and "R" in self.flags

    def __str__(self) -> str:
        def ep(a: str, p: int | None) -> str:
            return a if p is None else f"{a}.{p}"
        tail = f" [{self.flags}]" if self.proto == "tcp" else f" {self.proto}"
        return f"{ep(self.src, self.sport)} > {ep(self.dst, self.dport)}{tail}"


_TCPDUMP_LINE = re.compile(
    r"^(?P<time>\d+\.\d+)\s+(?:(?P<ifname>\S+)\s+(?P<dir>In|Out|M|B|P)\s+)?"
    r"(?P<l3>IP6?)\s+(?P<src>\S+)\s+>\s+(?P<dst>\S+?):\s+(?P<info>.*)$")


def _split_endpoint(text: str) -> tuple[str, int | None]:
    host, dot, port = text.rpartition(".")
    if dot and port.isdigit():
        try:
            ipaddress.ip_address(host)
            return host, int(port)
        except ValueError:
            pass
    return text, None


def parse_tcpdump_line(line: str) -> Packet | None:
    """One ``tcpdump -nn -tt`` line (``-i any`` lines carry the interface and direction).

    >>> p = parse_tcpdump_line('1700000000.000001 IP 10.0.0.3.8080 > 10.0.0.2.35582: '
    ...                        'Flags [S.], seq 1, ack 2, win 28960, length 0')
    >>> str(p), p.is_synack
    ('10.0.0.3.8080 > 10.0.0.2.35582 [S.]', True)
    """
    m = _TCPDUMP_LINE.match(line.strip())
    if not m:
        return None
    src, sport = _split_endpoint(m.group("src"))
    dst, dport = _split_endpoint(m.group("dst"))
    info = m.group("info")
    flags = ""
    if fm := re.match(r"Flags \[([^\]]*)\]", info):
        proto, flags = "tcp", fm.group(1)
    elif info.startswith("UDP"):
        proto = "udp"
    elif info.startswith("ICMP6"):
        proto = "icmp6"
    elif info.startswith("ICMP"):
        proto = "icmp"
    else:
        proto = "other"
    return Packet(float(m.group("time")), m.group("ifname"), m.group("dir"), src, sport, dst,
                  dport, proto, flags, line.strip())


class Capture:
    """Bounded tcpdump in one namespace; a context manager (see :meth:`Ns.capture`)."""

    def __init__(self, ns: Ns, ifname: str, filter: str, *, count: int | None,
                 timeout: float, settle: float) -> None:
        self.ns = ns
        self.ifname = ifname
        self.filter = filter
        self.count = count
        self.timeout = timeout
        self.settle = settle
        self.process: BackgroundProcess | None = None
        self.packets: list[Packet] = []
        self.lines: list[str] = []

    def __enter__(self) -> "Capture":
        argv = ["tcpdump", "-i", self.ifname, "-nn", "-tt", "-l", "-U", "-Z", "root"]
        if self.count:
            argv += ["-c", str(self.count)]
        argv += shlex.split(self.filter)
        self.process = self.ns.spawn(argv, name=f"{self.ns.short}-tcpdump-{self.ifname}",
                                     lifetime=self.timeout)
        proc = self.process

        def listening() -> bool:
            if "listening on" in proc.stderr():
                return True
            if not proc.running():
                raise HarnessError(f"tcpdump in {self.ns.name} exited: {proc.stderr().strip()}")
            return False
        try:
            wait_until(listening, timeout=3.0, what=f"tcpdump on {self.ifname} to start")
        except BaseException:
            proc.stop()
            raise
        return self

    def poll(self) -> list[Packet]:
        """Packets captured so far (the capture keeps running)."""
        assert self.process is not None
        self.lines = [ln for ln in self.process.stdout().splitlines() if ln.strip()]
        self.packets = [p for p in map(parse_tcpdump_line, self.lines) if p is not None]
        return self.packets

    def wait(self, predicate: Callable[[list[Packet]], object] | int, *,
             timeout: float = 3.0) -> list[Packet]:
        """Wait until ``predicate(packets)`` holds (an int means "at least that many")."""
        test = (lambda ps: len(ps) >= predicate) if isinstance(predicate, int) else predicate
        return wait_until(lambda: self.poll() if test(self.poll()) else None,
                          timeout=timeout, what=f"packets on {self.ifname}")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.running():
            time.sleep(self.settle)  # let in-flight packets reach the ring buffer
        self.process.stop()
        self.poll()

    def summary(self) -> list[str]:
        return [str(p) for p in self.packets]


# --------------------------------------------------------------------------------------------
# xtables-monitor --trace (nft backend)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One ``TRACE:`` line: ``table:chain:kind[:handle]:verdict`` plus the rule text.
    ``kind`` is ``rule``, ``return`` or ``policy``; ``handle`` is the nft rule handle
    (not the rule number); ``packet`` holds the fields of the preceding ``PACKET:`` line."""

    id: str
    table: str
    chain: str
    kind: str
    handle: str | None
    verdict: str
    rule: str
    packet: tuple[tuple[str, str], ...]

    def packet_field(self, key: str) -> str | None:
        return dict(self.packet).get(key)

    def __str__(self) -> str:
        parts = [self.table, self.chain, self.kind] + ([self.handle] if self.handle else [])
        return ":".join(parts + [self.verdict])


def parse_trace(text: str) -> list[TraceStep]:
    """Steps from ``xtables-monitor --trace`` output.

    >>> out = ('PACKET: 2 ab21 IN=sk1a SRC=10.0.1.2 DST=10.96.0.10 SPORT=36028 DPORT=80 SYN\\n'
    ...        ' TRACE: 2 ab21 nat:PREROUTING:rule:0x2:ACCEPT  -4 -t nat -A PREROUTING -j DNAT\\n')
    >>> step = parse_trace(out)[0]
    >>> str(step), step.rule, step.packet_field('DST')
    ('nat:PREROUTING:rule:0x2:ACCEPT', '-4 -t nat -A PREROUTING -j DNAT', '10.96.0.10')
    """
    steps: list[TraceStep] = []
    packets: dict[str, tuple[tuple[str, str], ...]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        kind, _, rest = line.partition(": ")
        if kind == "PACKET":
            fields = rest.split()
            if len(fields) < 2:
                continue
            kv = []
            for tok in fields[2:]:
                key, sep, value = tok.partition("=")
                kv.append((key, value) if sep else (tok, ""))
            packets[fields[1]] = tuple(kv)
        elif kind == "TRACE":
            fields = rest.split(None, 3)
            if len(fields) < 3:
                continue
            trace_id, spec = fields[1], fields[2]
            rule = fields[3].strip() if len(fields) > 3 else ""
            parts = spec.split(":")
            if len(parts) < 3:
                continue
            table, chain, what = parts[0], parts[1], parts[2]
            if what == "rule":
                handle, verdict = (parts[3] if len(parts) > 3 else None), ":".join(parts[4:])
            else:
                handle, verdict = None, ":".join(parts[3:])
            steps.append(TraceStep(trace_id, table, chain, what, handle, verdict, rule,
                                   packets.get(trace_id, ())))
    return steps


class Trace:
    """``xtables-monitor --trace`` with TRACE rules in raw PREROUTING/OUTPUT; bounded."""

    def __init__(self, ns: Ns, match: str, *, ipv6: bool, timeout: float,
                 settle: float) -> None:
        self.ns = ns
        self.match = shlex.split(match)
        self.ipv6 = ipv6
        self.timeout = timeout
        self.settle = settle
        self.process: BackgroundProcess | None = None
        self.steps: list[TraceStep] = []
        self._installed: list[str] = []

    def _rule(self, op: str, chain: str) -> list[str]:
        return ["-t", "raw", op, chain, *self.match, "-j", "TRACE"]

    def __enter__(self) -> "Trace":
        if not shutil.which("xtables-monitor"):
            raise Unsupported("xtables-monitor not installed")
        family = "-6" if self.ipv6 else "-4"
        self.process = self.ns.spawn(["xtables-monitor", "--trace", "--event", family],
                                     name=f"{self.ns.short}-xtables-monitor",
                                     lifetime=self.timeout, line_buffered=True)
        proc = self.process
        try:
            # The monitor prints no "ready" line; it is subscribed once it reports the
            # insertion of our own TRACE rule. Until then re-insert it, bounded.
            deadline = time.monotonic() + 3.0
            while True:
                for chain in ("PREROUTING", "OUTPUT"):
                    if chain in self._installed:
                        self.ns.iptables(self._rule("-D", chain), backend="nft", ipv6=self.ipv6)
                        self._installed.remove(chain)
                for chain in ("OUTPUT", "PREROUTING"):
                    self.ns.iptables(["-t", "raw", "-I", chain, "1", *self.match, "-j", "TRACE"],
                                     backend="nft", ipv6=self.ipv6)
                    self._installed.append(chain)
                try:
                    wait_until(lambda: "EVENT:" in proc.stdout(), timeout=0.25,
                               what="xtables-monitor")
                    break
                except HarnessTimeout:
                    if not proc.running() or time.monotonic() >= deadline:
                        raise HarnessError("xtables-monitor did not start: "
                                           + proc.stderr().strip()) from None
        except BaseException:
            self._remove_rules()
            proc.stop()
            raise
        return self

    def _remove_rules(self) -> None:
        for chain in list(self._installed):
            self.ns.run([Ns._xtables("nft", self.ipv6), "-w", "5", *self._rule("-D", chain)],
                        check=False)
            self._installed.remove(chain)

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        time.sleep(self.settle)
        self._remove_rules()
        self.process.stop()
        self.steps = parse_trace(self.process.stdout())

    def lines(self) -> list[str]:
        return [str(s) for s in self.steps]


# --------------------------------------------------------------------------------------------
# Capability probe and stale cleanup
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this machine can do for kernel tests. ``reason`` is why nothing works, if so;
    ``missing[feature]`` says why one optional feature is unavailable."""

    reason: str | None
    features: frozenset[str] = frozenset()
    missing: Mapping[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.reason is None

    def why_not(self, *features: str) -> str | None:
        """None if every feature is available, else a reason naming what is missing."""
        if self.reason:
            return self.reason
        lacking = [f"{f}: {self.missing.get(f, 'unknown feature')}" for f in features
                   if f not in self.features]
        return "; ".join(lacking) or None


#: Optional features and the tools they need.
_TOOLS = {
    "conntrack": ("conntrack",),
    "tcpdump": ("tcpdump",),
    "trace": ("xtables-monitor", "iptables-nft"),
    "setpriv": ("setpriv",),
}


def probe() -> Capabilities:
    """Find out, in a throwaway namespace, what kernel tests can use here."""
    if os.geteuid() != 0:
        return Capabilities("kernel tests need root (network namespaces, iptables)")
    for tool in ("ip", "timeout"):
        if not shutil.which(tool):
            return Capabilities(f"kernel tests need `{tool}` on PATH")
    features: set[str] = set()
    missing: dict[str, str] = {}
    try:
        with Lab() as lab:
            ns = lab.netns("probe")
            for backend in ("nft", "legacy"):
                tool = f"iptables-{backend}"
                if not shutil.which(tool) or not shutil.which(f"{tool}-restore"):
                    missing[backend] = f"{tool} / {tool}-restore not installed"
                    continue
                try:
                    ns.iptables("-t nat -S", backend=backend)  # type: ignore[arg-type]
                    features.add(backend)
                except HarnessError as exc:
                    missing[backend] = f"{tool} does not work here: {exc}"
            for feature, tools in _TOOLS.items():
                absent = [t for t in tools if not shutil.which(t)]
                if absent:
                    missing[feature] = f"{', '.join(absent)} not installed"
                else:
                    features.add(feature)
            if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
                features.add("bridge_nf")
            else:
                missing["bridge_nf"] = ("br_netfilter is not loaded "
                                        "(no net.bridge.bridge-nf-call-iptables)")
    except Unsupported as exc:
        return Capabilities(f"kernel tests cannot run: {exc}")
    except HarnessError as exc:
        return Capabilities(f"`ip netns` is unavailable: {exc}")
    if not features & {"nft", "legacy"}:
        return Capabilities("no working iptables: " + "; ".join(
            missing[b] for b in ("nft", "legacy")), frozenset(features), missing)
    return Capabilities(None, frozenset(features), missing)


def remove_stale_namespaces() -> list[str]:
    """Delete ``synack-<pid>-...`` namespaces whose creating process is gone (a run that was
    killed before it could clean up). Processes left in them end on their own: every
    background process runs under ``timeout``. Returns the names deleted."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        m = _STALE_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still alive (or the pid was reused): not ours to judge
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if run(["ip", "netns", "delete", name], check=False).returncode == 0:
            removed.append(name)
    return removed
