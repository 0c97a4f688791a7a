"""Report layer: what a person at a terminal gets on top of the plain text: colour on stdout,
a progress bar on stderr. Nothing when the stream is not a terminal (pipes, files, CI logs) or
NO_COLOR is set (https://no-color.org); JSON and SARIF never pass through here."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

# what to colour in synack's text output (ruff-like diagnostics, explain traces)
_STYLES = (
    (r"(?m)^\S+:\d+:\d+:", "bold"),
    (r"\b[A-Z]{3}\d{3}\b", "bold"),
    (r"\[error\]", "bold red"),
    (r"\[warning\]", "bold yellow"),
    (r"\[info\]", "cyan"),
    (r"(?m)^\s+\|\s+\^+$", "red"),
    (r"(?m)^\s+help:", "bold green"),
    (r"(?m)^\s+note:", "bold blue"),
    (r"(?m)^\s+witness:", "bold"),
    (r"NOT what it dialled[^)\n]*", "bold red"),
    (r"matches what it dialled|\(as dialled\)", "green"),
    (r"<unknown: give --addr>", "yellow"),
    (r"(?m)\[APPROXIMATE\]|^\s*approximate[^:]*:", "yellow"),
    (r"(?m)^outcome \d+ of \d+", "bold"),
    (r"(?m)^(Found .*|No findings\.)$", "bold"),
)


def _wants_colour(stream) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def write(text: str, stream=None) -> None:
    """Write synack's text output, in colour when ``stream`` is a terminal."""
    stream = stream or sys.stdout
    if not _wants_colour(stream):
        stream.write(text)
        return
    from rich.console import Console
    from rich.text import Text

    t = Text(text)
    for pattern, style in _STYLES:
        t.highlight_regex(pattern, style)
    Console(file=stream, force_terminal=True, highlight=False, emoji=False, markup=False,
            soft_wrap=True).print(t, end="")


@contextmanager
def progress(total: int, what: str, stream=None, delay: float = 1.0):
    """A transient progress bar on stderr for ``total`` steps, shown only on a terminal and only
    once the run has lasted ``delay`` seconds; yields ``advance(label)``."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()) or total <= 1:
        yield lambda label="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.monotonic()
    state: dict = {"bar": None, "task": None, "done": 0}
    console = Console(file=stream, force_terminal=True, no_color=bool(os.environ.get("NO_COLOR")))

    def advance(label: str = "") -> None:
        state["done"] += 1
        if state["bar"] is None and time.monotonic() - start >= delay:
            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=console, transient=True)
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task(what, total=total, completed=state["done"])
        if state["bar"] is not None:
            state["bar"].update(state["task"], completed=state["done"],
                                description=f"{what} {label}".rstrip())

    try:
        yield advance
    finally:
        if state["bar"] is not None:
            state["bar"].stop()
