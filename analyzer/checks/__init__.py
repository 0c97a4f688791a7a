"""Checks layer: each check is one function registered with a code; families live in modules.

A check receives a :class:`CheckContext` and yields :class:`~analyzer.diagnostics.Diagnostic`.
``restore=True`` marks checks that mirror what loading the rules would refuse, either in
iptables itself (also under ``iptables-restore --test``) or in the kernel at commit time (which
``--test`` never reaches): ``synack parse`` runs those too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from analyzer.diagnostics import Diagnostic, Severity


@dataclass(frozen=True, slots=True)
class CheckInfo:
    code: str
    name: str
    severity: Severity
    func: Callable
    summary: str
    restore: bool = False


REGISTRY: dict[str, CheckInfo] = {}


def check(code: str, name: str, severity: Severity, restore: bool = False):
    def deco(func):
        REGISTRY[code] = CheckInfo(code, name, severity, func, summary_of(func.__doc__) or name, restore)
        return func
    return deco


def summary_of(doc: str | None) -> str:
    """A check's summary: the docstring's whole first paragraph (a sentence may wrap).

    >>> summary_of('''A rule repeats an earlier rule,
    ...     with nothing in between.
    ...
    ...     Why it matters: ...''')
    'A rule repeats an earlier rule, with nothing in between.'
    """
    para = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        para.append(line.strip())
    return " ".join(para)


@dataclass
class CheckContext:
    """What a check may look at: the parsed ruleset and its source files (for messages)."""

    ruleset: object
    files: tuple = ()
    partial: bool = False  # input is a fragment/transaction: chains may exist elsewhere
    extra: dict = field(default_factory=dict)

    def source_line(self, span) -> str | None:
        for f in self.files:
            if f.path == span.path:
                return f.line(span.line)
        return None

    def diag(self, code: str, message: str, span, hint: str | None = None, **kw) -> Diagnostic:
        info = REGISTRY[code]
        sev = kw.pop("severity", info.severity)
        return Diagnostic(code, sev, message, span, hint, self.source_line(span) if span else None,
                          name=info.name, **kw)


# the family modules that hold the ``restore=True`` checks: ``synack parse`` imports only these
# (the others pull in the symbolic engine: 0.3 s of a parse); tests/test_parse_fastpath.py keeps it true
RESTORE_MODULES = ("chains", "targets")


def load_all(restore_only: bool = False) -> dict[str, CheckInfo]:
    """The registry after importing the family modules (every module in this package, or only
    RESTORE_MODULES), which registers their checks."""
    import importlib

    if restore_only:
        names = RESTORE_MODULES
    else:
        import pkgutil
        names = [m.name for m in pkgutil.iter_modules(__path__)]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return REGISTRY


def run_checks(ctx: CheckContext, select=None, ignore=None, restore_only: bool = False,
               on_check=None, before=None) -> list[Diagnostic]:
    """Every selected check on ``ctx``; ``before(code)`` and ``on_check(code)`` are called before
    and after each (progress)."""
    out: list[Diagnostic] = []
    for code, info in sorted(load_all(restore_only).items()):
        if restore_only and not info.restore:
            continue
        if not selected(code, info.name, select, ignore):
            continue
        if before is not None:
            before(code)
        out.extend(info.func(ctx))
        if on_check is not None:
            on_check(code)
    return out


def selected(code: str, name: str | None, select, ignore) -> bool:
    """``--select``/``--ignore`` take codes, code prefixes (``CHN``) or check names."""
    def hit(patterns):
        return any(code.startswith(p) or p == name for p in patterns)
    if select and not hit(select):
        return False
    return not (ignore and hit(ignore))
