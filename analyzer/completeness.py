"""Results layer: what a lint run could not read or follow, as reasons (``lint --fail-on-incomplete``,
``complete``/``incomplete`` in JSON and SARIF), read from its diagnostics and ``lint --env``'s coverage.

A reason counts when "No findings." would promise more than synack checked (docs/ci.md says why
each one counts, and what does not).
"""
from __future__ import annotations

import re

from analyzer.diagnostics import Severity

#: parse warnings that leave a match synack cannot evaluate: verdicts depending on it are APPROXIMATE
APPROXIMATE_READS = {
    "PRS009": "an unknown match module",
    "PRS101": "a host name",
    "PRS102": "an anonymised address or MAC",
    "PRS103": "an ipset not in the dump",
    "PRS105": "a user or group name",
}

SHOWN_PLACES = 10  # per reason, in JSON/SARIF (the text names the first only)

#: a machine-dependent value is reported once per file, its other uses counted in the message
#: (parse/iptables.py, _count_repeats)
_MORE_USES = re.compile(r"\(used (\d+) more times? in this file\)$")


def _uses(d) -> int:
    """How many matches a PRS1xx diagnostic stands for (its value's every use in the file)."""
    m = _MORE_USES.search(d.message)
    return d.count * (1 + (int(m.group(1)) if m else 0))


def _s(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _place(span, code: str | None = None, **kw) -> dict:
    p = {"path": span.path, "line": span.line}
    if code:
        p["code"] = code
    p.update(kw)
    return p


def incomplete(diags, coverage: dict | None) -> list[dict]:
    """The reasons a lint's clean result would not be a promise, in a fixed order; [] when
    everything in scope was read and followed. ``diags``: the diagnostics lint reports (after
    --select/--ignore and suppressions, before grouping); ``coverage``: lint --env's counts.

    Each reason: ``{"reason": KEY, "count": N, "message": TEXT, "places": [{path, line, ...}]}``.

    >>> from analyzer.diagnostics import Diagnostic
    >>> from analyzer.source import Span
    >>> d = Diagnostic("PRS009", Severity.WARNING, "unknown match module 'x'", Span("a.rules", 3, 4, 5))
    >>> [(r["reason"], r["count"], r["message"][:58]) for r in incomplete([d], None)]
    [('approximate-matches', 1, '1 match synack cannot evaluate (an unknown match module): ')]
    >>> incomplete([], {"branches_not_followed": 0, "translations_in_part": [], "left_environment": 0})
    []
    """
    out: list[dict] = []
    errors = [d for d in diags if d.code.startswith("PRS") and d.severity == Severity.ERROR]
    if errors:
        n = sum(d.count for d in errors)
        out.append({"reason": "parse-errors", "count": n,
                    "message": f"{_s(n, 'line')} iptables-restore refuses (PRS errors), read in part or not at all",
                    "places": [_place(d.span, d.code) for d in errors[:SHOWN_PLACES] if d.span]})
    approx = [d for d in diags if d.code in APPROXIMATE_READS]
    if approx:
        n = sum(_uses(d) for d in approx)
        kinds = ", ".join(dict.fromkeys(APPROXIMATE_READS[d.code] for d in approx))
        out.append({"reason": "approximate-matches", "count": n,
                    "message": f"{_s(n, 'match', 'matches')} synack cannot evaluate ({kinds}): verdicts that "
                               f"depend on {'it' if n == 1 else 'them'} are APPROXIMATE",
                    "places": [_place(d.span, d.code) for d in approx[:SHOWN_PLACES] if d.span]})
    if not coverage:
        return out
    part = coverage.get("translations_in_part") or []
    if part:
        out.append({"reason": "translations-in-part", "count": len(part),
                    "message": f"{_s(len(part), 'translation')} followed in part or not at all",
                    "places": [{"path": p["path"], "line": p["line"], "why": p["why"]} for p in part[:SHOWN_PLACES]]})
    n = coverage.get("branches_not_followed", 0)
    if n:
        out.append({"reason": "branches-not-followed", "count": n,
                    "message": f"{_s(n, 'branch', 'branches')} over the cap of {coverage.get('max_outcomes')} "
                               "not followed", "places": []})
    n, b = coverage.get("left_environment", 0), coverage.get("branches_left", 0)
    if n or b:
        what = " and ".join(x for x in (n and f"{_s(n, 'flow')} entirely",
                                        b and f"{_s(b, 'branch', 'branches')} of other flows") if x)
        out.append({"reason": "left-environment", "count": n + b,
                    "message": f"{what} left the environment (for somewhere it does not describe: "
                               "not followed to the end)", "places": []})
    n = coverage.get("approximate_flows", 0)
    if n:
        out.append({"reason": "approximate-flows", "count": n,
                    "message": f"{_s(n, 'flow')} followed APPROXIMATELY (the walk stood in for something "
                               "it does not model exactly"
                               + (f", e.g. {coverage['approximate_examples'][0]['why']}"
                                  if coverage.get("approximate_examples") else "") + ")",
                    "places": [dict(x) for x in coverage.get("approximate_examples", [])[:SHOWN_PLACES]]})
    return out


def summary(reasons: list[dict]) -> str:
    """One line for stderr: why ``--fail-on-incomplete`` made the exit 1."""
    return ("synack: not everything in scope was read and followed (--fail-on-incomplete): "
            + "; ".join(r["message"] for r in reasons))
