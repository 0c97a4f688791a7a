"""Policy layer: a policy file (YAML) -> validated, located assertions.

The file is checked against the JSON Schema shipped next to this module (``schema.json``);
every error points at the file:line:col of the offending YAML node.
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from analyzer.diagnostics import Severity
from analyzer.source import Span

KINDS = ("reachable", "blocked", "translated-to", "symmetric", "no-finding", "unchanged-from")
PROTO_NUMBER = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}
PORT_PROTOS = (6, 17, 132)


class PolicyError(ValueError):
    """An unusable policy file: every problem, each at its file:line:col."""

    def __init__(self, problems: list[tuple[Span | None, str]]):
        self.problems = problems
        super().__init__("; ".join(m for _, m in problems))

    def render(self) -> str:
        return "\n".join(f"{s.render() + ': ' if s else ''}POL001 [error] {m}" for s, m in self.problems)


@dataclass(frozen=True, slots=True)
class FlowSel:
    """A set of flows as the policy names it: every combination of the values given.

    >>> f = flow_selector({"proto": "tcp", "dst": "10.0.0.0/24", "dport": "80,443"})
    >>> f.protos, [str(n) for n in f.dst], f.dport
    ((6,), ['10.0.0.0/24'], ((80, 80), (443, 443)))
    """

    start: str | None = None            # environment: namespace of the process opening the connection
    iif: str | None = None              # dump: input interface
    local: bool = False                 # dump: locally generated
    uid: int | None = None
    gid: int | None = None
    mark: int = 0
    protos: tuple[int, ...] | None = None   # None: any protocol
    src: tuple | None = None            # networks; None: the natural default
    src_negated: bool = False
    dst: tuple | None = None
    dst_negated: bool = False
    sport: tuple[tuple[int, int], ...] | None = None
    dport: tuple[tuple[int, int], ...] | None = None

    def describe(self) -> str:
        p = "any protocol" if self.protos is None else ",".join(
            {v: k for k, v in PROTO_NUMBER.items()}.get(x, str(x)) for x in self.protos)
        nets = lambda ns, neg: ("any" if ns is None else ("!" if neg else "") + ",".join(str(n) for n in ns))
        rng = lambda rs: "" if rs is None else ":" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in rs)
        where = f" from '{self.start}'" if self.start else f" in on {self.iif}" if self.iif else \
            " generated locally" if self.local else ""
        if self.src is None and self.start:
            src, where = f"'{self.start}'", ""
        else:
            src = nets(self.src, self.src_negated)
        return f"{p} {src}{rng(self.sport)} -> " \
               f"{nets(self.dst, self.dst_negated)}{rng(self.dport)}{where}"


@dataclass(frozen=True, slots=True)
class Assertion:
    name: str
    kind: str
    severity: Severity
    body: dict
    span: Span                          # where the assertion starts in the policy file
    flows: FlowSel | None = None
    description: str = ""


@dataclass
class Policy:
    path: str
    assertions: list[Assertion]
    target: dict = field(default_factory=dict)
    description: str = ""

    def resolve(self, rel: str) -> str:
        """A path named in the policy, relative to the policy file."""
        return rel if os.path.isabs(rel) else os.path.normpath(os.path.join(os.path.dirname(self.path), rel))


def schema() -> dict:
    return json.loads(resources.files("analyzer.policy").joinpath("schema.json").read_text("utf-8"))


def _ports(v) -> tuple[tuple[int, int], ...]:
    items = v if isinstance(v, list) else str(v).split(",") if isinstance(v, str) else [v]
    out = []
    for it in items:
        lo, _, hi = str(it).partition("-")
        lo, hi = int(lo), int(hi or lo)
        if lo > hi or hi > 65535:
            raise ValueError(f"invalid port range '{it}'")
        out.append((lo, hi))
    return tuple(out)


def _nets(v) -> tuple[tuple, bool]:
    items = v if isinstance(v, list) else [v]
    neg = False
    nets = []
    for it in items:
        s = str(it)
        if s.startswith("!"):
            neg, s = True, s[1:]
        nets.append(ipaddress.ip_network(s, strict=False))
    return tuple(nets), neg


def flow_selector(d: dict) -> FlowSel:
    protos = d.get("proto")
    if protos is None:
        protos = (6,) if ("sport" in d or "dport" in d) else None
    elif protos == "any":
        protos = None
    else:
        protos = tuple(PROTO_NUMBER.get(p, p) if isinstance(p, str) else int(p)
                       for p in (protos if isinstance(protos, list) else [protos]))
    src, sneg = _nets(d["src"]) if "src" in d else (None, False)
    dst, dneg = _nets(d["dst"]) if "dst" in d else (None, False)
    fams = {n.version for n in (src or ()) + (dst or ())}
    if len(fams) > 1:
        raise ValueError("src and dst mix IPv4 and IPv6")
    return FlowSel(d.get("from"), d.get("iif"), bool(d.get("local", False)), d.get("uid"), d.get("gid"),
                   int(d.get("mark", 0)), protos, src, sneg, dst, dneg,
                   _ports(d["sport"]) if "sport" in d else None, _ports(d["dport"]) if "dport" in d else None)


# ------------------------------------------------------------------ YAML with locations
def _to_python(node, path: tuple, marks: dict):
    marks[path] = node.start_mark
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            key = yaml.safe_load(yaml.serialize(k)) if not isinstance(k, yaml.ScalarNode) else k.value
            marks[path + (key, "__key__")] = k.start_mark
            out[key] = _to_python(v, path + (key,), marks)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, path + (i,), marks) for i, v in enumerate(node.value)]
    # scalars: let PyYAML's resolver type them (int, bool, str ...)
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    return _scalar(node)


def _scalar(node):
    """A scalar typed by PyYAML's resolver (int, bool, float, null)."""
    return yaml.safe_load(yaml.serialize(node))


def _span(path: str, marks: dict, at: tuple) -> Span:
    at = tuple(at)
    while at and at not in marks:
        at = at[:-1]
    m = marks.get(at)
    if m is None:
        return Span(path, 1, 1, 2)
    return Span(path, m.line + 1, m.column + 1, m.column + 2)


def _best(err):
    from jsonschema.exceptions import best_match
    while err.context:
        nxt = best_match(err.context)
        if nxt is None or nxt is err:
            break
        err = nxt
    return err


def load_policy(path: str, text: str | None = None) -> Policy:
    """Parse and validate a policy file; raises PolicyError with every problem located."""
    from jsonschema import Draft202012Validator

    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PolicyError([(None, f"cannot read {path}: {e.strerror}")]) from None
        except UnicodeDecodeError:
            raise PolicyError([(None, f"{path}: not UTF-8 text; a policy is YAML (docs/policy.md)")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        m = getattr(e, "problem_mark", None)
        span = Span(path, m.line + 1, m.column + 1, m.column + 2) if m else None
        raise PolicyError([(span, f"invalid YAML: {getattr(e, 'problem', None) or e}")]) from None
    if node is None:
        raise PolicyError([(Span(path, 1, 1, 2), "empty policy: expected a mapping with 'assertions:'")])
    marks: dict = {}
    doc = _to_python(node, (), marks)
    validator = Draft202012Validator(schema())
    problems = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        e = _best(err)
        at = tuple(e.absolute_path)
        where = "/".join(str(p) for p in at) or "(top level)"
        msg = e.message
        if e.validator == "oneOf" and e.validator_value and isinstance(e.validator_value, list) \
                and all(isinstance(x, dict) and set(x) == {"required"} for x in e.validator_value):
            kinds = [x["required"][0] for x in e.validator_value]
            present = [k for k in kinds if isinstance(e.instance, dict) and k in e.instance]
            msg = (f"an assertion has exactly one of {', '.join(kinds)}"
                   + (f" (this one has {', '.join(present)})" if present else " (this one has none)"))
        elif e.validator == "unevaluatedProperties" or e.validator == "additionalProperties":
            msg = msg.replace("Unevaluated properties are not allowed", "unknown key(s)") \
                     .replace("Additional properties are not allowed", "unknown key(s)")
        problems.append((_span(path, marks, at), f"{where}: {msg}"))
    if problems:
        raise PolicyError(problems)
    assertions = []
    names = {}
    for i, a in enumerate(doc["assertions"]):
        span = _span(path, marks, ("assertions", i))
        kind = next(k for k in KINDS if k in a)
        body = a[kind]
        if a["name"] in names:
            problems.append((span, f"assertions/{i}: duplicate name '{a['name']}' (first at line {names[a['name']]})"))
        names.setdefault(a["name"], span.line)
        flows = None
        if kind != "no-finding":
            try:
                flows = flow_selector(body)
            except ValueError as e:
                problems.append((_span(path, marks, ("assertions", i, kind)), f"assertions/{i}/{kind}: {e}"))
                continue
        assertions.append(Assertion(a["name"], kind, Severity[a.get("severity", "error").upper()], body, span,
                                    flows, a.get("description", "")))
    if problems:
        raise PolicyError(problems)
    return Policy(path, assertions, doc.get("target") or {}, doc.get("description", ""))
