"""Corpus agreement: ``synack parse`` against ``iptables-restore --test`` on every dump we have.

For every iptables file under ``../shared/corpus/`` (skipped when absent) this runs synack's
parse plus the restore-mirroring checks (what ``synack parse`` prints), and runs the real
``iptables-restore`` in one throwaway network namespace. The issue's contract:

* restore accepts the file => synack reports no error;
* restore rejects it       => synack reports a diagnostic on the line restore blames: an error
  when any machine would refuse it, a warning when the refusal depends on the machine the dump
  came from (an ipset, a host name, an owner name, an anonymised address, a chain created by an
  earlier transaction);
* parse never raises.

Oracles (all iptables 1.8.9; the family is the one synack detects):

``nft --test``     ``iptables-restore --test`` with the nf_tables backend (the default binary):
                   the acceptance oracle. A rejection must have a diagnostic on its line.
``legacy --test``  stricter on chain references and on a final COMMIT without newline. What it
                   alone rejects must be at most a warning (kube-proxy's partial transactions
                   jump to chains of the previous sync), and have a diagnostic on its line.
``nft commit``     only when ``--test`` accepts: a real commit in the namespace, so the kernel
                   checks what ``--test`` never sends it (``-m tcp`` without ``-p tcp``,
                   MASQUERADE outside nat POSTROUTING, nfacct objects). ``Invalid argument`` is
                   a kernel refusal: synack must report an error there.
``legacy --test``  iterated: the blamed line is neutralised and the file re-run, so that every
  (iterated)       line restore objects to is known. A machine-dependent refusal is answered
                   with what the machine would have had (the ipset match dropped, a real MAC,
                   an address for a host name ...), so restore goes on checking the rest of the
                   line; other lines are emptied, CRLF stripped. Every synack *error* must sit
                   on a line restore rejects for a machine-independent reason.

``python tests/test_corpus.py`` prints the agreement table of ``docs/corpus.md``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analyzer.diagnostics import Severity  # noqa: E402
from analyzer.parse import detect_family, load_ruleset  # noqa: E402

CORPUS = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus"))
FOLDERS = ("iptables", "nft", "k8s")
ITERATE_CAP = 12  # re-runs of legacy --test per rejected file (each ~5 ms)

# Files whose disagreement is out of scope for the parser, with the reason. Keep this short and
# explicit; test_known_exceptions_still_needed fails once a file agrees again.
KNOWN_EXCEPTIONS: dict[str, str] = {}


# --------------------------------------------------------------------------- which files
def _iptables_ish(text: str) -> bool:
    """nft/ and k8s/ hold other formats; take a file from there only if it reads as iptables."""
    return bool(re.search(r"(?m)^\s*(\*(filter|nat|mangle|raw|security)\s*$|-A \S+ |ip6?tables )", text))


def corpus_files() -> list[Path]:
    out = []
    for folder in FOLDERS:
        base = CORPUS / folder
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if not p.is_file() or p.name.startswith(".") or p.suffix == ".json":
                continue  # .gitattributes; kube-proxy *.flows.json are oracle data, not dumps
            if folder != "iptables" and not _iptables_ish(p.read_text(errors="replace")):
                continue
            out.append(p)
    return out


def _read(p: Path) -> str:
    # as the CLI reads: newline=None would turn CRLF into LF and hide what restore sees
    with open(p, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


# --------------------------------------------------------------------------- the oracle
@dataclass(frozen=True)
class Verdict:
    rc: int
    line: int | None = None
    msg: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0


_LINE_RES = (
    re.compile(r"Error occurred at line: (\d+)"),
    re.compile(r"^line (\d+): ", re.M),          # nft commit: "line 9: RULE_APPEND failed (...)"
    re.compile(r"line (\d+) failed"),
    re.compile(r"COMMIT expected at line (\d+)"),  # end of input: one past the last line
    re.compile(r"[Ll]ine:? (\d+)"),
)


def _blamed_line(msg: str) -> int | None:
    for rx in _LINE_RES:
        m = rx.search(msg)
        if m:
            return int(m.group(1))
    return None


class Netns:
    """One throwaway network namespace for every restore run of the session."""

    def __init__(self):
        self.name = f"synack-corpus-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.tmp = tempfile.mkdtemp(prefix="synack-corpus-")
        self.env = dict(os.environ, XTABLES_LOCKFILE=os.path.join(self.tmp, "xtables.lock"), LC_ALL="C")

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0:
            return "needs root for a network namespace"
        for b in ("ip", "iptables-nft-restore", "iptables-legacy-restore",
                  "ip6tables-nft-restore", "ip6tables-legacy-restore", "nft"):
            if shutil.which(b) is None:
                return f"'{b}' not installed"
        return None

    def __enter__(self):
        r = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if r.returncode:
            raise OSError(f"ip netns add: {r.stderr.strip()}")
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def restore(self, text: str, family: int, backend: str = "nft", test: bool = True) -> Verdict:
        binary = f"ip{'6' if family == 6 else ''}tables-{backend}-restore"
        cmd = [binary, "--test"] if test else [binary]
        if backend == "legacy":
            cmd.append("-w")  # legacy takes the xtables lock even for --test
        if not test:  # leave the namespace empty for the next file
            cmd = ["sh", "-c", f'{binary}; rc=$?; nft flush ruleset; exit $rc']
        data = text.encode("utf-8", "surrogateescape")
        try:
            r = subprocess.run(["ip", "netns", "exec", self.name, "timeout", "20", *cmd], input=data,
                               capture_output=True, env=self.env)
        except OSError as e:
            return Verdict(99, None, str(e))
        msg = (r.stderr + r.stdout).decode("utf-8", "replace").strip()
        return Verdict(r.returncode, _blamed_line(msg) if r.returncode else None, msg)


# --------------------------------------------------------------------------- restore's reasons
# Where restore refuses for the layout of the text only, synack deliberately warns and reads the
# dump anyway (docs/corpus.md, "deviations"): CRLF, indentation and blank-only lines, a final
# COMMIT without newline, and formats that are not restore input (`iptables -S`, command lists).
DELIBERATE = frozenset({"PRS106", "PRS107", "PRS108", "PRS109"})

_HOST = re.compile(r"host/network [`']([^']*)' not found")
_OWNER = re.compile(r'Bad value for "--(uid|gid)-owner" option: "([^"]*)"')
_SET = re.compile(r"Set (\S+) doesn't exist")
_CHAIN = re.compile(r"Couldn't load target [`']([^']*)'|Chain '([^']*)' does not exist")
_ANON_MAC = re.compile(r"(--mac-source\s+)(?=[0-9a-fA-F:]*[xX])[0-9a-fA-FxX:]+(?=\s|$)")


def machine_dependent(msg: str, line: str = "") -> str | None:
    """The kind of a refusal that depends on the machine the dump came from, else None: an ipset,
    an anonymised MAC, a host name or placeholder, an owner name, a chain of an earlier
    transaction, a missing nfacct object (commit: "No such file or directory")."""
    if _SET.search(msg):
        return "set"
    if "Invalid MAC address" in msg and _ANON_MAC.search(line):
        return "mac"
    m = _HOST.search(msg)
    if m:  # a name resolves on the machine; a malformed or other-family address never does
        v = m.group(1).split("/")[0]
        return None if re.fullmatch(r"[\d.]+|[\da-fA-F:.]*:[\da-fA-F:.]*", v) else "host"
    m = _OWNER.search(msg)
    if m:
        return None if m.group(2).isdigit() else "owner"
    if _CHAIN.search(msg):
        return "chain"
    if "RULE_APPEND failed (No such file or directory)" in msg:
        return "object"
    return None


def _substitute(lines: list[str], kind: str, msg: str, family: int) -> None:
    """Give restore what the machine would have had, on every line, so that it checks the rest."""
    if kind == "set":
        for k, l in enumerate(lines):
            if re.search(r"-j SET\b", l):
                lines[k] = ""
            elif "--match-set" in l:
                lines[k] = re.sub(r"(-m set\s+)?(!\s+)?--match-set\s+\S+\s+\S+", "", l)
    elif kind == "mac":
        lines[:] = [_ANON_MAC.sub(r"\g<1>00:00:00:00:00:00", l) for l in lines]
    elif kind == "host":
        name = re.escape(_HOST.search(msg).group(1))
        ip = "2001:db8::1" if family == 6 else "192.0.2.1"
        lines[:] = [re.sub(rf"(?<=\s){name}(?=[/\s,]|$)", ip, l) for l in lines]
    elif kind == "owner":
        m = _OWNER.search(msg)
        lines[:] = [re.sub(rf"(--{m.group(1)}-owner\s+){re.escape(m.group(2))}(?=\s|$)", r"\g<1>0", l)
                    for l in lines]
    elif kind == "chain":
        m = _CHAIN.search(msg)
        name = re.escape(m.group(1) or m.group(2))
        lines[:] = [re.sub(rf"-[jg]\s+{name}(?=\s|$)", "-j RETURN", l) for l in lines]


def _neutralise(lines: list[str], n: int, msg: str, family: int) -> bool:
    """Make restore stop objecting to line n (1-based) without moving later lines."""
    if not 1 <= n <= len(lines):
        if n == len(lines) + 1 and "COMMIT expected" in msg:
            lines.append("COMMIT")
            return True
        return False
    line = lines[n - 1]
    if "\r" in line:
        lines[:] = [l.replace("\r", "") for l in lines]
        return True
    kind = machine_dependent(msg, line)
    if kind is not None:
        before = list(lines)
        _substitute(lines, kind, msg, family)
        if lines != before:
            return True
    if line.strip() == "COMMIT" and line != "COMMIT":
        lines[n - 1] = "COMMIT"
        return True
    if line == "COMMIT" or line.lstrip().startswith("*"):
        return False  # emptying a table's frame would cascade: stop here
    if line == "":
        return False
    lines[n - 1] = ""
    return True


def iterate_legacy(ns: Netns, text: str, family: int, first: Verdict) -> tuple[dict[int, list[str]], bool]:
    """Every line legacy --test rejects (line -> its messages), and whether the list is complete."""
    blamed: dict[int, list[str]] = {}
    lines = text.split("\n")
    v = first
    for _ in range(ITERATE_CAP):
        if v.ok:
            return blamed, True
        if v.line is None:
            return blamed, False
        blamed.setdefault(v.line, []).append(v.msg)
        if not _neutralise(lines, v.line, v.msg, family):
            return blamed, False
        v = ns.restore("\n".join(lines), family, "legacy")
    return blamed, v.ok


# --------------------------------------------------------------------------- synack
def synack(text: str, path: str):
    """What ``synack parse`` reports: parse diagnostics plus the restore-mirroring checks."""
    res = load_ruleset((text, path))
    diags = list(res.diagnostics)
    try:
        from analyzer.checks import CheckContext, run_checks
    except ImportError:
        return res, diags
    diags += run_checks(CheckContext(res.ruleset, res.files, partial=res.format in ("S", "cmd")),
                        restore_only=True)
    return res, diags


# --------------------------------------------------------------------------- one file
@dataclass
class Row:
    path: str                      # relative to the corpus
    folder: str
    family: int = 4
    nft_test: Verdict | None = None
    legacy_test: Verdict | None = None
    nft_commit: Verdict | None = None
    blamed: dict[int, list[str]] = field(default_factory=dict)  # legacy, iterated
    complete: bool = True
    errors: int = 0
    warnings: int = 0
    problems: list[str] = field(default_factory=list)
    exception: str | None = None
    excused: list[str] = field(default_factory=list)  # problems a KNOWN_EXCEPTIONS entry covers

    @property
    def accepted(self) -> bool:
        return bool(self.nft_test and self.nft_test.ok)

    @property
    def agrees(self) -> bool:
        return not self.problems


def oracle(ns: Netns, row: Row, text: str) -> None:
    """--test runs only: they leave the namespace as it was, so files may run in parallel."""
    row.nft_test = ns.restore(text, row.family, "nft")
    row.legacy_test = ns.restore(text, row.family, "legacy")
    if not row.legacy_test.ok:
        row.blamed, row.complete = iterate_legacy(ns, text, row.family, row.legacy_test)


def _msg(v: Verdict) -> str:
    """restore's reason, without the program banner and the usage hint."""
    lines = [l.split("): ", 1)[-1].strip() for l in v.msg.splitlines()
             if l.strip() and not l.startswith(("Try `", "Error occurred"))]
    return " | ".join(l for l in lines if l)[:110]


def judge(row: Row, text: str, diags) -> None:
    lines = text.split("\n")
    nlines = len(lines)

    def at(n: int | None, errors_only=False):
        if n is None:
            return []
        want = {n} if n <= nlines else {n, nlines}  # end of input: restore counts one past it
        return [d for d in diags if d.span is not None and d.span.line in want
                and (not errors_only or d.severity == Severity.ERROR)]

    def line_text(n):
        return lines[n - 1] if n and 1 <= n <= nlines else ""

    errors = [d for d in diags if d.severity == Severity.ERROR]
    row.errors, row.warnings = len(errors), sum(1 for d in diags if d.severity == Severity.WARNING)
    p = row.problems
    nt, lt, nc = row.nft_test, row.legacy_test, row.nft_commit

    if not nt.ok:
        if nt.line is None:
            p.append(f"nft --test rejects without a line: {nt.msg[:120]}")
        elif machine_dependent(nt.msg, line_text(nt.line)):
            if not at(nt.line):
                p.append(f"nft --test line {nt.line} ({_msg(nt)}): no diagnostic there")
        elif not at(nt.line, errors_only=True) and not any(d.code in DELIBERATE for d in at(nt.line)):
            p.append(f"nft --test line {nt.line} ({_msg(nt)}): no error there"
                     + (" (only a warning)" if at(nt.line) else ""))
    if not lt.ok and lt.line is not None and not at(lt.line):
        p.append(f"legacy --test line {lt.line} ({_msg(lt)}): no diagnostic there")
    kernel_refused: set[int] = set()
    if nc is not None and not nc.ok and nc.line is not None:
        if "Invalid argument" in nc.msg:
            kernel_refused.add(nc.line)
            if not at(nc.line, errors_only=True):
                p.append(f"nft commit line {nc.line} ({_msg(nc)}): kernel refuses, no error there")
        elif line_text(nc.line).strip() != "COMMIT" and not at(nc.line):
            p.append(f"nft commit line {nc.line} ({_msg(nc)}): no diagnostic there")

    # errors only where restore (or the kernel) refuses for a machine-independent reason
    allowed = set(kernel_refused)
    if not nt.ok and nt.line is not None and not machine_dependent(nt.msg, line_text(nt.line)):
        allowed |= {nt.line, min(nt.line, nlines)}
    if nt.ok:
        allowed_legacy = set()  # what only legacy rejects must stay a warning
    else:
        allowed_legacy = {k for k, ms in row.blamed.items()
                          if any(not machine_dependent(m, line_text(k)) for m in ms)}
        allowed_legacy |= {min(k, nlines) for k in allowed_legacy}
    allowed |= allowed_legacy
    horizon = nlines + 1 if row.complete else max([*row.blamed, nt.line or 0, lt.line or 0])
    stray = sorted({d.span.line for d in errors if d.span is not None and d.span.line not in allowed
                    and d.span.line < horizon})
    if stray:
        d = next(d for d in errors if d.span.line == stray[0])
        why = "restore accepts the file" if nt.ok and not kernel_refused else \
            "restore's objection there is machine-dependent" if stray[0] in row.blamed else \
            "restore does not object to that line"
        p.append(f"synack error(s) on line(s) {stray[:8]} ({why}); first: {d.code} {d.message}")


def check_file(ns: Netns | None, p: Path):
    """Phase 1 (parallel): synack and the --test oracles. Returns (row, text, diagnostics)."""
    rel = p.relative_to(CORPUS).as_posix()
    row = Row(rel, "/".join(rel.split("/")[:2]))
    text = _read(p)
    try:
        row.family = detect_family(text)
        _res, diags = synack(text, rel)
    except Exception as e:  # never a traceback, for any input
        import traceback
        row.problems.append("synack raised: " + "".join(traceback.format_exception_only(e)).strip())
        row.exception = traceback.format_exc()
        return row, text, None
    if ns is not None:
        oracle(ns, row, text)
    return row, text, diags


def finish(ns: Netns, row: Row, text: str, diags) -> Row:
    """Phase 2 (one file at a time: it changes the namespace): commit, then judge."""
    if diags is None:
        return row
    if row.nft_test.ok:
        row.nft_commit = ns.restore(text, row.family, "nft", test=False)
    judge(row, text, diags)
    if row.path in KNOWN_EXCEPTIONS and row.problems:
        row.excused, row.problems = row.problems, []
    return row


# --------------------------------------------------------------------------- the table
def render_table(rows: list[Row]) -> str:
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.folder, []).append(r)
    head = ("| folder | files | `--test` accepts (nft) | legacy accepts | commit accepts | "
            "synack: files with errors | errors | warnings | agreement |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    out = []

    def line(name, rs):
        acc = sum(1 for r in rs if r.accepted)
        leg = sum(1 for r in rs if r.legacy_test and r.legacy_test.ok)
        com = sum(1 for r in rs if r.nft_commit and r.nft_commit.ok)
        ef = sum(1 for r in rs if r.errors)
        agree = sum(1 for r in rs if r.agrees and not r.excused)
        known = sum(1 for r in rs if r.excused)
        return (f"| {name} | {len(rs)} | {acc} | {leg} | {com} | {ef} | {sum(r.errors for r in rs)} | "
                f"{sum(r.warnings for r in rs)} | {agree}/{len(rs)}"
                + (f" (+{known} known exception{'s' if known > 1 else ''})" if known else "") + " |")

    for k in sorted(by):
        out.append(line(k, by[k]))
    out.append(line("**total**", rows))
    return head + "\n".join(out) + "\n"


def survey(files=None) -> list[Row]:
    files = corpus_files() if files is None else files
    reason = Netns.unavailable()
    if reason:
        return [check_file(None, p)[0] for p in files]
    with Netns() as ns:
        with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
            done = list(pool.map(lambda p: check_file(ns, p), files))
        return [finish(ns, *d) for d in done]


# --------------------------------------------------------------------------- tests
pytestmark = pytest.mark.slow

if not CORPUS.is_dir():
    pytest.skip(f"corpus not found at {CORPUS}", allow_module_level=True)


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return survey()


def test_parse_never_raises(rows):
    bad = [f"{r.path}: {r.problems[0]}" for r in rows if r.exception]
    assert not bad, "\n".join(bad)


def test_agrees_with_iptables_restore(rows):
    reason = Netns.unavailable()
    if reason:
        pytest.skip(reason)
    print("\n" + render_table(rows))
    bad = [f"{r.path}:\n    " + "\n    ".join(r.problems) for r in rows if r.problems and not r.exception]
    assert not bad, f"{len(bad)} file(s) disagree with iptables-restore:\n" + "\n".join(bad)


def test_known_exceptions_still_needed(rows):
    """An exception whose file now agrees (or is gone) must be removed from the list."""
    if Netns.unavailable():
        pytest.skip(Netns.unavailable())
    excused = {r.path for r in rows if r.excused}
    stale = [k for k in KNOWN_EXCEPTIONS if k not in excused]
    assert not stale, f"these files agree now (or left the corpus): drop them from KNOWN_EXCEPTIONS: {stale}"


if __name__ == "__main__":
    import time

    t0 = time.time()
    only = [CORPUS / a for a in sys.argv[1:]] or None
    rs = survey(only)
    for r in rs:
        if r.problems or r.excused:
            print(f"{r.path} [{'acc' if r.accepted else 'REJ'}]{' (known exception)' if r.excused else ''} "
                  + "; ".join(r.problems or r.excused))
    print(render_table(rs))
    print(f"{len(rs)} files in {time.time() - t0:.1f}s", file=sys.stderr)
