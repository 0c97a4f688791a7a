"""Source layer: where a piece of input came from (path, line, column)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """A location: 1-based line and column, exclusive end column (as Lark and SARIF count).

    >>> Span("rules.v4", 3, 5, 9).render()
    'rules.v4:3:5'
    """

    path: str
    line: int
    col: int
    end_col: int

    def render(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One input as read: its display path and its lines without line endings."""

    path: str
    lines: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str, path: str) -> "SourceFile":
        # CRLF pastes and a missing final newline are both normal in dumps people paste.
        if "\r" in text:  # a scan at C speed spares two copies of a large dump
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return cls(path, tuple(text.split("\n")))

    def line(self, n: int) -> str:
        return self.lines[n - 1] if 0 < n <= len(self.lines) else ""
