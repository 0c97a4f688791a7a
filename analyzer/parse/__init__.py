"""Parse layer: text inputs (iptables dumps, later Cilium and ip outputs) -> model."""
from analyzer.parse.iptables import ParseResult, StrictError, detect_family, detect_format, load_ruleset

__all__ = ["ParseResult", "StrictError", "detect_family", "detect_format", "load_ruleset", "load_path"]


def load_path(path: str, **kw) -> ParseResult:
    """Parse a file (``-`` is standard input)."""
    import sys

    if path == "-":
        return load_ruleset((sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "<stdin>"), **kw)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return load_ruleset((f.read(), path), **kw)
