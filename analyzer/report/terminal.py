"""Report layer: what a person at a terminal gets on top of the plain text: colour on stdout,
a progress bar on stderr. Nothing when the stream is not a terminal (pipes, files, CI logs) or
NO_COLOR is set (https://no-color.org); JSON and SARIF never pass through here."""
from __future__ import annotations

import os
import sys
import threading
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


def _interactive(stdout, stderr) -> bool:
    """A person is watching: both streams are a terminal, and neither NO_COLOR nor TERM=dumb asks
    for plain output."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return all(bool(getattr(s, "isatty", None) and s.isatty()) for s in (stdout, stderr))


class _Bar:
    """What ``progress`` yields. ``bar(label, n)`` counts ``n`` finished steps; ``bar.now(label)``
    names the step under way (a long parse shows its name and the clock while it runs);
    ``bar.part(fraction, n)`` shows how far into the next ``n`` steps a long step is."""

    def __init__(self, total: int, what: str, stream, delay: float, enabled: bool):
        self.total, self.what, self.stream, self.done = max(total, 1), what, stream, 0
        self.label, self._bar, self._task, self._closed = "", None, None, False
        self._lock = threading.Lock()
        self._timer = None
        if enabled and delay <= 0:
            self._show()
        elif enabled:
            # shown only once the run has lasted ``delay``: a quick lint never flashes a bar
            self._timer = threading.Timer(delay, self._show)
            self._timer.daemon = True
            self._timer.start()

    def _show(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with self._lock:
            if self._closed:
                return
            console = Console(file=self.stream, force_terminal=True)
            bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                           TimeElapsedColumn(), console=console, transient=True)
            self._task = bar.add_task(self._description(), total=self.total, completed=self.done)
            bar.start()
            self._bar = bar

    def _description(self) -> str:
        return f"{self.what} {self.label}".rstrip()

    def _update(self, completed: float, refresh: bool = False) -> None:
        if self._bar is not None:
            with self._lock:
                if self._bar is not None:
                    self._bar.update(self._task, completed=completed, description=self._description(),
                                     refresh=refresh)

    def __call__(self, label: str = "", n: int = 1) -> None:
        self.done += n
        if label:
            self.label = label
        self._update(self.done)

    def now(self, label: str, refresh: bool = True) -> None:
        """``refresh``: draw at once (a new stage) rather than at the next of 10 redraws a second."""
        self.label = label
        self._update(self.done, refresh)

    def part(self, fraction: float, n: int) -> None:
        self._update(self.done + max(0.0, min(1.0, fraction)) * n)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._bar is not None:
                self._bar.stop()  # transient: the bar's lines are erased
                self._bar = None


@contextmanager
def progress(total: int, what: str, stream=None, delay: float | None = None, enabled: bool = True,
             stdout=None):
    """A transient progress bar on stderr for ``total`` steps; yields a :class:`_Bar`.

    Shown only when a person watches (stdout and stderr both a terminal, no NO_COLOR, TERM not
    dumb, ``enabled``: the caller's -q, JSON, SARIF turn it off) and only once the run has lasted
    ``delay`` seconds (default 1, or ``SYNACK_PROGRESS_DELAY``)."""
    stream = stream or sys.stderr
    if delay is None:
        try:
            delay = float(os.environ.get("SYNACK_PROGRESS_DELAY", "1"))
        except ValueError:
            delay = 1.0
    on = enabled and total > 1 and _interactive(stdout or sys.stdout, stream)
    bar = _Bar(total, what, stream, delay, on)
    try:
        yield bar
    finally:
        bar.close()
