"""Report layer: one namespace's explain result as text: a one-line-per-outcome summary
(probability, verdict, final tuple, what the client sees), then each outcome's trace.

Reads the outcomes explain computed (forward and reply traces, the conntrack entry); decides
nothing about packets. Caveats shared by every outcome are printed once, under the summary.
"""
from __future__ import annotations

import re

from analyzer.model.packet import tcp_flag_names
from analyzer.netfilter.trace import Kind

UNKNOWN_MASQ = "<unknown: give --addr>"
_UNSPECIFIED = re.compile(r"(?<![\w.:])(0\.0\.0\.0|\[::\]|::)(?=[:\s/)]|$)")


def _masq_unknown(oc) -> bool:
    """MASQUERADE with no address known for the output interface: the walk writes 0.0.0.0 (::)."""
    return any(s.kind is Kind.MASQUERADE and s.after.src.is_unspecified for s in oc.forward.steps)


def _fix(text: str, unknown: bool) -> str:
    """The unspecified address MASQUERADE stands in with, said as what it is.

    >>> _fix("tcp 0.0.0.0:41000 -> 10.0.2.2:8080", True)
    'tcp <unknown: give --addr>:41000 -> 10.0.2.2:8080'
    >>> _fix("MASQUERADE to 0.0.0.0", True), _fix("tcp 10.0.0.0:1 -> 1.2.3.4:5", True)
    ('MASQUERADE to <unknown: give --addr>', 'tcp 10.0.0.0:1 -> 1.2.3.4:5')
    """
    return _UNSPECIFIED.sub(UNKNOWN_MASQ, text) if unknown else text


def _dedupe(items) -> list[str]:
    return list(dict.fromkeys(items))


def _approx(oc) -> list[str]:
    return _dedupe(list(oc.forward.approx) + list(oc.reply.approx if oc.reply else []))


def _where(steps) -> str:
    last = next((s for s in reversed(steps) if s.kind not in (Kind.ROUTE, Kind.REPLY)), None)
    return f" at {last.where}:{last.verdict}" if last is not None else ""


def _sees(oc) -> str:
    if oc.reply is None:
        if oc.disposition == "rejected":
            return "the client gets the rejection"
        if oc.disposition == "not-sent":
            return "no packet leaves"
        o = oc.forward.ct.original
        syn = o.proto == 6 and getattr(o, "tcp_flags", 0x02) == 0x02
        return "the client gets no answer" + (" (its connect times out)" if syn else "")
    if oc.client_sees is None:
        return f"the reply is {oc.reply.disposition}{_where(oc.reply.steps)}: the client gets no answer"
    ok = "as dialled" if oc.reply_ok else "NOT what it dialled: RST"
    return f"client sees {oc.client_sees.tuple_str()} ({ok})"


def summary_line(k: int, oc) -> str:
    unk = _masq_unknown(oc)
    prob = "" if oc.forward.prob is None else f"p={oc.forward.prob:.3f} "
    final = oc.forward.pkt.tuple_str() if oc.disposition in ("forwarded", "delivered", "delivered-locally", "sent", "tproxy") \
        else None
    head = f"  {k}. {prob}{oc.disposition}" + (f" as {final}" if final else
                                               (f": {oc.detail}" if oc.detail else _where(oc.forward.steps)))
    conf = "" if oc.confidence == "EXACT" else f" [{oc.confidence}]"
    return _fix(f"{head}; {_sees(oc)}{conf}", unk)


def packet_extras(flow) -> str:
    """What the flow says beyond the tuple and flags, when not the default: `` mark 0x4000
    ctstate ESTABLISHED connmark 0x1``."""
    from analyzer.model.packet import CT_INPUT

    out = f" mark {flow.mark:#x}" if flow.mark else ""
    if flow.ctstate != CT_INPUT["NEW"]:
        out += " ctstate " + next((n for n, b in CT_INPUT.items() if b == flow.ctstate), str(flow.ctstate))
    if flow.connmark:
        out += f" connmark {flow.connmark:#x}"
    return out


def render(flow, outcomes, where: str) -> str:
    flags = f" flags {tcp_flag_names(flow.tcp_flags)}" if flow.proto == 6 and flow.tcp_flags != 0x02 else ""
    out = [f"flow: {flow.tuple_str()}{flags}{packet_extras(flow)} ({where})", ""]
    n = len(outcomes)
    out.append(f"{n} outcome{'s' if n != 1 else ''}:")
    out += [summary_line(k, oc) for k, oc in enumerate(outcomes, 1)]
    approx = [_approx(oc) for oc in outcomes]
    common = [a for a in approx[0] if all(a in other for other in approx[1:])] if n > 1 else []
    for a in common:
        out.append(f"approximate (every outcome): {a}")
    out.append("")
    for k, oc in enumerate(outcomes, 1):
        unk = _masq_unknown(oc)
        lines = []
        prob = "" if oc.forward.prob is None else f" p={oc.forward.prob:.3f}"
        lines.append(f"outcome {k} of {n}{prob} [{oc.confidence}]: {oc.disposition}"
                     + (f": {oc.detail}" if oc.detail else ""))
        for s in oc.forward.steps:
            lines.append("  " + s.render().replace("\n", "\n  "))
        ct = oc.forward.ct
        said = any(s.kind is Kind.CONNTRACK for s in oc.forward.steps)
        if oc.reply is not None:
            # one statement about the entry: the opening conntrack step already says OFF/UNTRACKED/INVALID
            if ct.in_use and not ct.untracked and not getattr(ct, "invalid", False):
                lines.append(f"  conntrack entry: original {ct.original.tuple_str()}  reply {ct.reply_tuple()}")
            elif not said:
                why = ("no rule needs conntrack, so the kernel keeps no entry" if not ct.in_use else
                       "untracked" if ct.untracked else "INVALID: the kernel made no entry")
                lines.append(f"  conntrack: none ({why})")
            lines.append("  reply:")
            for s in oc.reply.steps:
                lines.append("    " + s.render().replace("\n", "\n    "))
            lines.append(f"    => {oc.reply.disposition}" + (f": {oc.reply.detail}" if oc.reply.detail else ""))
            if oc.client_sees is not None:
                mark = "matches what it dialled" if oc.reply_ok else \
                    "NOT what it dialled: the client's kernel has no socket for it and answers RST"
                lines.append(f"  client sees: {oc.client_sees.tuple_str()}  ({mark})")
        for a in approx[k - 1]:
            if a not in common:
                lines.append(f"  approximate: {a}")
        out += [_fix(line, unk) for line in lines]
        out.append("")
    return "\n".join(out).rstrip() + "\n"
