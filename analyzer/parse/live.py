"""Parse layer: read the rules of a running system, read-only.

The right source is ``iptables-save`` of the backend the system uses (nf_tables on most hosts,
legacy on older ones), run in the right network namespace. python-iptables (``iptc``) is offered
as an optional, legacy-only source: it reads zero rules from the nf_tables backend (upstream
issue #342) and is ~50x slower than ``iptables-legacy-save``.
"""
from __future__ import annotations

import shutil
import subprocess


class LiveError(Exception):
    pass


def _run(argv: list[str], timeout: float = 30) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LiveError(f"'{argv[0]}' not found: install iptables (and iproute2 for --netns)") from None
    except subprocess.TimeoutExpired:
        raise LiveError(f"'{' '.join(argv)}' did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        raise LiveError(f"'{' '.join(argv)}' failed: {r.stderr.strip() or r.returncode}")
    return r.stdout


def detect_backend() -> str:
    """'nft' or 'legacy': what plain ``iptables`` is on this machine."""
    out = _run(["iptables", "-V"])
    return "nft" if "nf_tables" in out else "legacy"


def save_command(family: int, backend: str) -> list[str]:
    base = "ip6tables" if family == 6 else "iptables"
    name = f"{base}-{backend}-save" if backend in ("nft", "legacy") else f"{base}-save"
    if shutil.which(name) is None:
        name = f"{base}-save"
    return [name, "-c"]


def read_live(family: int = 4, backend: str = "auto", netns: str | None = None) -> tuple[str, str]:
    """(text, display path) of the live ruleset. Only reads: iptables-save never changes rules."""
    if backend == "iptc":
        return read_iptc(family), f"<python-iptables legacy, IPv{family}>"
    if backend == "auto":
        backend = detect_backend() if netns is None else _ns_backend(netns)
    argv = save_command(family, backend)
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    return _run(argv), f"<live {backend}{' netns ' + netns if netns else ''} IPv{family}>"


def _ns_backend(netns: str) -> str:
    out = _run(["ip", "netns", "exec", netns, "iptables", "-V"])
    return "nft" if "nf_tables" in out else "legacy"


def read_iptc(family: int = 4) -> str:  # pragma: no cover - optional dependency
    """Legacy backend only, through python-iptables; refuses rather than return a wrong empty set."""
    try:
        import iptc  # type: ignore
    except ImportError:
        raise LiveError("python-iptables is not installed: pip install 'synack[legacy]' "
                        "(legacy backend only; prefer the default iptables-save source)") from None
    if detect_backend() == "nft":
        raise LiveError("python-iptables reads zero rules from the nf_tables backend this system uses "
                        "(python-iptables issue #342): use the default source (iptables-save)")
    easy = iptc.easy
    lines = []
    for table in ("raw", "mangle", "nat", "filter"):
        lines.append(f"*{table}")
        for chain, rules in easy.dump_table(table, ipv6=family == 6).items():
            builtin = easy.is_builtin_chain(table, chain, ipv6=family == 6)
            pol = easy.get_policy(table, chain, ipv6=family == 6)[0] if builtin else "-"
            lines.append(f":{chain} {pol} [0:0]")
        for chain, rules in easy.dump_table(table, ipv6=family == 6).items():
            for r in rules:
                lines.append(f"-A {chain} " + " ".join(_iptc_rule_args(r)))
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _iptc_rule_args(d: dict) -> list[str]:  # pragma: no cover - optional dependency
    out = []
    for k, v in d.items():
        if k in ("target", "counters"):
            continue
        if isinstance(v, dict):
            out += ["-m", k] + [f"--{o} {a}" for o, a in v.items()]
        else:
            out += [f"--{k}", str(v)]
    t = d.get("target")
    if isinstance(t, dict):
        name, opts = next(iter(t.items()))
        out += ["-j", name] + [f"--{o} {a}" for o, a in (opts or {}).items()]
    elif t:
        out += ["-j", str(t)]
    return out
