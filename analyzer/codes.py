"""Every diagnostic code synack can emit, in one table: parse (PRS), environment (ENV) and the
registered checks (CHN, NAT, ...), each with its name, usual severity, one-line summary and docs
page. `synack checks`, SARIF rules and code selection read it."""
from __future__ import annotations

from dataclasses import dataclass

from analyzer import DOCS_URL


@dataclass(frozen=True, slots=True)
class CodeInfo:
    code: str
    name: str
    severity: str
    summary: str
    doc: str  # path of its docs page in the repository, with an anchor where the page has several

    @property
    def help_uri(self) -> str:
        return DOCS_URL + self.doc


def doc_path(code: str) -> str:
    """Where a code is documented.

    >>> doc_path("PRS019"), doc_path("ENV002"), doc_path("CHN005")
    ('docs/parse-errors.md#prs019', 'docs/environment.md#env002', 'docs/checks/CHN005.md')
    """
    if code.startswith("PRS"):
        return f"docs/parse-errors.md#{code.lower()}"
    if code.startswith("ENV"):
        return f"docs/environment.md#{code.lower()}"
    if code == "POL001":
        return "docs/policy.md#pol001"
    if code.startswith("POL"):
        return f"docs/ci.md#{code.lower()}"
    return f"docs/checks/{code}.md"


def all_codes() -> dict[str, CodeInfo]:
    from analyzer.checks import load_all
    from analyzer.parse.envfile import ENV_CODES
    from analyzer.parse.iptables import PARSE_CODES, PARSE_SEVERITIES

    out = {c: CodeInfo(c, n, PARSE_SEVERITIES.get(c, "error"), s, doc_path(c))
           for c, (n, s) in PARSE_CODES.items()}
    out |= {c: CodeInfo(c, n, "warning", s, doc_path(c)) for c, (n, s) in ENV_CODES.items()}
    from analyzer.policy.config import POL_CODES
    out |= {c: CodeInfo(c, n, sev, s, doc_path(c)) for c, (n, sev, s) in POL_CODES.items()}
    from analyzer.parse import cilium
    out |= {c: CodeInfo(c, n, cilium.PARSE_SEVERITIES.get(c, "error"), s, f"docs/cilium.md#{c.lower()}")
            for c, (n, s) in cilium.PARSE_CODES.items()}
    out |= {c: CodeInfo(c, i.name, i.severity.label, i.summary, doc_path(c)) for c, i in load_all().items()}
    return dict(sorted(out.items()))
