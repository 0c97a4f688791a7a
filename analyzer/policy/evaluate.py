"""Policy layer: assertions -> results, each failing one with witness flows and their traces.

Every question goes through analyzer.policy.adapter (one module between the policy and the flow
engine); this module only decides what holds.
"""
from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field

from analyzer.policy.adapter import End, Exploration, TargetError, explore, load_target
from analyzer.policy.spec import Assertion, Policy
from analyzer.source import Span

PASS, FAIL, ERROR = "pass", "fail", "error"
MAX_WITNESSES = 3


@dataclass
class Witness:
    """One flow that shows why an assertion fails: its class, what happened, the trace."""

    flow: str
    packets: str
    fate: str
    trace: str
    trace_json: dict
    span: Span | None = None        # the rule that decided, in the dump
    baseline: str | None = None     # unchanged-from: the fate in the baseline
    baseline_trace: str | None = None
    baseline_span: Span | None = None
    code: str | None = None         # no-finding: the lint code that fired


@dataclass
class Result:
    assertion: Assertion
    status: str
    message: str
    witnesses: list[Witness] = field(default_factory=list)
    approximate: bool = False
    classes: int = 0
    failing: int = 0                # failing classes (or findings)


def _nets(v):
    items = v if isinstance(v, list) else [v]
    return [ipaddress.ip_network(str(x).lstrip("!"), strict=False) for x in items]


def _ports(v):
    from analyzer.policy.spec import _ports as p
    return p(v)


def end_matches(e: End, to: dict | None) -> bool:
    """Whether an end reaches the destination the assertion names (any reached end if none)."""
    if not e.reached:
        return False
    if not to:
        return True
    if "namespace" in to and e.namespace != to["namespace"]:
        return False
    if "listener" in to and e.listener != to["listener"]:
        return False
    if "port" in to and (e.port is None or not any(lo <= e.port <= hi for lo, hi in _ports(to["port"]))):
        return False
    if "address" in to and (e.address is None or not any(e.address in n for n in _nets(to["address"])
                                                          if n.version == e.address.version)):
        return False
    if "interface" in to and not fnmatch.fnmatchcase(e.interface or "", to["interface"].replace("+", "*")):
        return False
    if "local" in to and (e.disposition in ("delivered", "delivered-locally", "tproxy")) != bool(to["local"]):
        return False
    return True


def _witness(c, fate, **kw) -> Witness:
    return Witness(c.witness.tuple_str(), c.text, fate.summary(), fate.trace_text, fate.trace_json,
                   fate.decisive, **kw)


def _flow_result(a: Assertion, ex: Exploration, bad, what_fails: str, what_holds: str) -> Result:
    """``bad(class) -> fate or None``: the classes that break the assertion become witnesses."""
    failing = []
    for c in ex.classes:
        f = bad(c)
        if f is not None:
            failing.append((c, f))
    n = len(ex.classes)
    scope = a.flows.describe()
    approx = not ex.complete or any(f.approximate for c in ex.classes for f in c.fates)
    if not failing:
        return Result(a, PASS, f"{what_holds} ({scope}; {n} class{'es' if n != 1 else ''})",
                      [], approx, n, 0)
    return Result(a, FAIL, f"{what_fails} ({len(failing)} of {n} class{'es' if n != 1 else ''} of {scope})",
                  [_witness(c, f) for c, f in failing[:MAX_WITNESSES]], approx, n, len(failing))


ENV_ONLY_TO, DUMP_ONLY_TO = ("namespace", "listener"), ("interface", "local")


def check_reach(a: Assertion, target, blocked: bool) -> Result:
    to = a.body.get("to")
    wrong = [k for k in (to or {}) if k in (DUMP_ONLY_TO if target.kind == "env" else ENV_ONLY_TO)]
    if wrong:
        raise TargetError(f"'to: {wrong[0]}' applies to {'dumps' if target.kind == 'env' else 'environments'} "
                          f"only; this input is {'an environment' if target.kind == 'env' else 'a dump'}")
    ex = explore([target], a.flows)

    def bad(c):
        f = c.fates[0]
        hits = [end_matches(e, to) for e in f.ends]
        if blocked:
            return f if any(hits) else None
        return f if not hits or not all(hits) else None
    dest = _to_text(to)
    if blocked:
        return _flow_result(a, ex, bad, f"flows reach {dest}", f"no flow reaches {dest}")
    return _flow_result(a, ex, bad, f"flows do not reach {dest}", f"every flow reaches {dest}")


def _to_text(to) -> str:
    if not to:
        return "a destination"
    return ", ".join(f"{k} {v}" for k, v in to.items())


def _backends(spec) -> list[tuple]:
    out = []
    for b in spec:
        if isinstance(b, str):
            addr, _, port = b.rpartition(":")
            out.append((ipaddress.ip_address(addr.strip("[]")), int(port), None))
        else:
            out.append((ipaddress.ip_address(b["address"]), b.get("port"), b.get("share")))
    return out


def check_translated(a: Assertion, target) -> Result:
    want = _backends(a.body["backends"])
    tol = a.body.get("tolerance", 0.02)
    ex = explore([target], a.flows)
    want_text = ", ".join(f"{ad}:{p}" if p is not None else str(ad) for ad, p, _ in want)
    notes = {}

    def bad(c):
        f = c.fates[0]
        got = [(e.backend[0], e.backend[1], e.prob) for e in f.ends if e.backend is not None]
        shares: dict = {}
        for ad, p, prob in got:
            shares[(ad, p)] = shares.get((ad, p), 0.0) + (prob if prob is not None else 1.0)
        problems = []
        seen = set()
        for ad, p, share in want:
            keys = [k for k in shares if k[0] == ad and (p is None or k[1] == p)]
            if not keys:
                problems.append(f"never translated to {ad}" + (f":{p}" if p is not None else ""))
                continue
            seen.update(keys)
            got_share = sum(shares[k] for k in keys)
            if share is not None and abs(got_share - share) > tol:
                problems.append(f"{ad}:{p} gets {got_share:.3f} of the connections, not {share}")
        extra = [f"{k[0]}:{k[1]}" for k in shares if k not in seen]
        if extra:
            problems.append(f"also translated to {', '.join(extra)}")
        if not shares:
            problems = [f"not translated at all ({f.summary()})"]
        if problems:
            notes[id(c)] = "; ".join(problems)
            return f
        return None
    r = _flow_result(a, ex, bad, f"flows are not translated to exactly {want_text}",
                     f"every flow is translated to {want_text}")
    if r.status == FAIL:
        first = next(c for c in ex.classes if id(c) in notes)
        r.message = f"{notes[id(first)]}: " + r.message
    return r


def check_symmetric(a: Assertion, target) -> Result:
    ex = explore([target], a.flows)

    def bad(c):
        f = c.fates[0]
        if any(d.code in ("NAT001", "NAT002") for d in f.findings) or any(e.symmetric is False for e in f.ends):
            return f
        return None
    r = _flow_result(a, ex, bad, "replies do not come back through their translation",
                     "every reply comes back through its translation")
    for w, c in zip(r.witnesses, [c for c in ex.classes if bad(c) is not None]):
        d = next((d for d in c.fates[0].findings if d.code in ("NAT001", "NAT002") and d.span), None)
        if c.fates[0].translation is not None:  # the translation the reply misses is the rule to look at
            w.span = c.fates[0].translation
        if d is not None:
            w.span = d.span
            w.fate += f"; {d.code}: {d.message}"
    return r


def check_unchanged(a: Assertion, target, policy: Policy) -> Result:
    base = load_target(policy.resolve(a.body["baseline"]), **_dump_context(policy))
    if base.kind != target.kind:
        raise TargetError(f"baseline {base.label} is a{'n environment' if base.kind == 'env' else ' dump'}; "
                          f"the checked input is not")
    ex = explore([target, base], a.flows)
    failing = [c for c in ex.classes if c.fates[0].signature() != c.fates[1].signature()]
    n = len(ex.classes)
    approx = not ex.complete
    if not failing:
        return Result(a, PASS, f"every flow keeps its fate ({a.flows.describe()}; {n} classes)", [], approx, n)
    ws = [_witness(c, c.fates[0], baseline=c.fates[1].summary(), baseline_trace=c.fates[1].trace_text,
                   baseline_span=c.fates[1].decisive) for c in failing[:MAX_WITNESSES]]
    return Result(a, FAIL, f"flows change fate from {base.label} ({len(failing)} of {n} classes of "
                           f"{a.flows.describe()})", ws, approx, n, len(failing))


def check_no_finding(a: Assertion, target) -> Result:
    codes = a.body["codes"]
    scope = a.body.get("scope") or {}
    diags = target.lint(codes)
    sup = getattr(target, "suppressor", None)
    if sup is not None:  # suppressions next to the rules hold for policies too
        if target.kind == "env":
            sup.add_env(target.env)
        else:
            for f in target.files:
                sup.add_dump(f.path, f.lines)
        diags = sup.filter(diags)
    kept = []
    for d in diags:
        if scope.get("paths") and not (d.span and any(fnmatch.fnmatch(d.span.path, p) or
                                                      fnmatch.fnmatch(d.span.path, "*/" + p)
                                                      for p in scope["paths"])):
            continue
        if scope.get("namespaces"):
            ns = target.namespace_of(d.span.path) if (d.span and target.kind == "env") else None
            if ns not in scope["namespaces"]:
                continue
        if scope.get("tables") or scope.get("chains"):
            tc = target.chain_of(d.span) if d.span else None
            if tc is None or (scope.get("tables") and tc[0] not in scope["tables"]) or \
                    (scope.get("chains") and tc[1] not in scope["chains"]):
                continue
        kept.append(d)
    where = f" within {', '.join(f'{k} {v}' for k, v in scope.items())}" if scope else ""
    if not kept:
        return Result(a, PASS, f"{', '.join(codes)} do not fire{where}")
    from analyzer.diagnostics import render_text
    ws = [Witness(d.witness or "", "", f"{d.code} {d.message}", render_text(d), {}, d.span, code=d.code)
          for d in kept[:MAX_WITNESSES]]
    return Result(a, FAIL, f"{len(kept)} finding(s) of {', '.join(sorted({d.code for d in kept}))}{where}",
                  ws, any(d.confidence != "EXACT" for d in kept), 0, len(kept))


def _dump_context(policy: Policy) -> dict:
    t = policy.target or {}
    return {"addresses": t.get("addresses", ()), "routes": t.get("routes", ()), "sysctls": t.get("sysctls")}


def evaluate(policy: Policy, target) -> list[Result]:
    results = []
    for a in policy.assertions:
        try:
            if a.kind in ("reachable", "blocked"):
                r = check_reach(a, target, a.kind == "blocked")
            elif a.kind == "translated-to":
                r = check_translated(a, target)
            elif a.kind == "symmetric":
                r = check_symmetric(a, target)
            elif a.kind == "no-finding":
                r = check_no_finding(a, target)
            else:
                r = check_unchanged(a, target, policy)
        except (TargetError, ValueError, OSError) as e:
            r = Result(a, ERROR, f"cannot be answered: {e}")
        results.append(r)
    return results
