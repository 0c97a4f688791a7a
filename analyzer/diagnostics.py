"""Results layer: a finding or a parse error, located, with a hint; what every report renders."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from analyzer.source import Span


class Severity(IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


EXACT = "EXACT"
APPROXIMATE = "APPROXIMATE"


@dataclass(frozen=True, slots=True)
class Related:
    """Another place a diagnostic points at ("translated here", "reply leaves here")."""

    message: str
    span: Span


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    severity: Severity
    message: str
    span: Span | None
    hint: str | None = None
    source_line: str | None = None
    confidence: str = EXACT
    related: tuple[Related, ...] = ()
    witness: str | None = None
    name: str | None = None
    # a group of the same finding repeated in one file (group()): how many, and where the others are
    count: int = 1
    also: tuple[Span, ...] = ()

    def sort_key(self):
        s = self.span
        return (s.path, s.line, s.col, self.code) if s else ("", 0, 0, self.code)


SHOWN_LOCATIONS = 5  # of a group: the first, then this many more by place


def group(diags, shown: int = SHOWN_LOCATIONS) -> list[Diagnostic]:
    """The same finding (code and message) repeated in one file becomes one diagnostic with a
    count and its first locations; order is kept (a group sits where its first member was).

    >>> ds = [Diagnostic("PRS019", Severity.ERROR, "old negation", Span("f", n, 5, 6)) for n in (3, 4, 9)]
    >>> [(d.span.line, d.count, [s.line for s in d.also]) for d in group(ds)]
    [(3, 3, [4, 9])]
    """
    from dataclasses import replace

    first: dict[tuple, int] = {}
    members: list[list[Diagnostic]] = []
    for d in diags:
        key = (d.code, d.message, d.severity, d.span.path if d.span else None)
        if d.span is None or key not in first:
            first[key] = len(members)
            members.append([d])
        else:
            members[first[key]].append(d)
    return [ms[0] if len(ms) == 1 else
            replace(ms[0], count=sum(m.count for m in ms), also=tuple(m.span for m in ms[1:1 + shown]))
            for ms in members]


def render_text(d: Diagnostic) -> str:
    """ruff-style rendering: location, code, message, the line, a caret, a hint.

    >>> d = Diagnostic("PRS002", Severity.ERROR, "unknown option '--dprot'",
    ...                Span("r.v4", 14, 17, 24), hint="did you mean '--dport'?",
    ...                source_line="-A INPUT -p tcp --dprot 22 -j ACCEPT")
    >>> print(render_text(d))
    r.v4:14:17: PRS002 [error] unknown option '--dprot'
      14 | -A INPUT -p tcp --dprot 22 -j ACCEPT
         |                 ^^^^^^^
      help: did you mean '--dport'?
    """
    s = d.span
    head = f"{s.render()}: " if s else ""
    out = [f"{head}{d.code} [{d.severity.label}] {d.message}" + (f" ({d.count} times)" if d.count > 1 else "")]
    if d.confidence != EXACT:
        out[0] += f" ({d.confidence})"
    if s is not None and d.source_line is not None:
        num = str(s.line)
        pad = " " * len(num)
        text = d.source_line.expandtabs(1)
        if not text.isprintable():  # never send the input's control bytes to a terminal; one
            text = "".join(c if c.isprintable() else "?" for c in text)  # '?' each: carets align
        out.append(f"  {num} | {text}")
        width = max(1, min(s.end_col, len(text) + 1) - s.col)
        out.append(f"  {pad} | {' ' * (s.col - 1)}{'^' * width}")
    for r in d.related:
        out.append(f"  note: {r.message} at {r.span.render()}")
    if d.count > 1:
        more = d.count - 1 - len(d.also)
        lines = ", ".join(str(s.line) for s in d.also) + (f" and {more} more" if more > 0 else "")
        out.append(f"  note: {d.count - 1} more like this in {d.span.path}: line{'s' if d.count > 2 else ''} "
                   f"{lines} (--no-group lists each)")
    if d.witness:
        out.append(f"  witness: {d.witness}")
    if d.hint:
        out.append(f"  help: {d.hint}")
    return "\n".join(out)
