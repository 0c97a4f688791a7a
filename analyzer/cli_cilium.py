"""Command line, Cilium inputs: ``synack parse``/``synack lint`` on service lists, bpf lb lists,
statedb tables, lbmaps dumps, JSON service lists and status reports (docs/cilium.md)."""
from __future__ import annotations

import sys

from analyzer.diagnostics import Severity

EXIT_OK, EXIT_FINDINGS, EXIT_UNUSABLE = 0, 1, 2


def read_inputs(args):
    """[(text, path)] of the DUMP arguments, or None after an error message."""
    out = []
    for path in args.dumps:
        try:
            if path == "-":
                out.append((sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "<stdin>"))
            else:
                with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                    out.append((f.read(), path))
        except OSError as e:
            sys.stderr.write(f"synack: error: cannot read {path}: {e.strerror}\n")
            return None
    return out


def is_cilium(args) -> bool:
    """``--format cilium``, or every DUMP is a Cilium dump (the auto-detection)."""
    if getattr(args, "fmt", "auto") == "cilium":
        return True
    if getattr(args, "fmt", "auto") != "auto" or getattr(args, "live", False) or not args.dumps:
        return False
    from analyzer.parse.kinds import identify

    for path in args.dumps:
        if path == "-":
            return False  # stdin is read once: only --format cilium routes it here
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                head = f.read(20000)
        except OSError:
            return False
        if not identify(head).name.startswith("cilium"):
            return False
    return True


def load(args):
    from analyzer.parse.cilium import parse_cilium

    inputs = read_inputs(args)
    if inputs is None:
        return None
    results = [parse_cilium(text, path) for text, path in inputs]
    if getattr(args, "strict", False):
        from analyzer.diagnostics import render_text
        for r in results:
            for d in r.diagnostics:
                if d.severity == Severity.ERROR:
                    sys.stderr.write(render_text(d) + "\n")
                    sys.stderr.write("synack: stopped at the first error (--strict)\n")
                    return None
    return results


def summary(results) -> dict:
    out = []
    for r in results:
        lst = []
        for x in r.dump.listings:
            item = {"kind": x.kind, "line": x.span.line if x.span else None}
            if x.section:
                item["section"] = x.section
            if x.services:
                item["services"] = len(x.services)
                item["backends"] = sum(len(s.backends) for s in x.services)
            if x.backends:
                item["table_backends"] = len(x.backends)
            if x.revnat:
                item["revnat"] = len(x.revnat)
            if x.service_meta:
                item["service_rows"] = len(x.service_meta)
            if x.node_addresses:
                item["node_addresses"] = len(x.node_addresses)
            if x.status is not None:
                st = x.status
                item["status"] = {k: getattr(st, k) for k in (
                    "version", "kpr", "socket_lb", "socket_lb_hostns_only", "lb_mode", "host_routing",
                    "masquerading")}
            lst.append(item)
        out.append({"source": r.dump.path, "format": f"cilium-{r.format}", "listings": lst})
    return {"inputs": out}


def services_json(results) -> list:
    out = []
    for r in results:
        for x in r.dump.listings:
            for s in x.services:
                out.append({
                    "source": r.dump.path, "listing": x.kind, "section": x.section, "id": s.id,
                    "frontend": str(s.frontend), "scope": s.scope, "type": s.type, "name": s.name,
                    "ext_traffic_policy": s.ext_policy, "int_traffic_policy": s.int_policy,
                    "source_ranges": None if s.source_ranges is None else [str(n) for n in s.source_ranges],
                    "flags": sorted(s.flags), "revnat_id": s.revnat_id,
                    "line": s.span.line if s.span else None,
                    "backends": [{"address": str(b.endpoint), "state": b.state, "weight": b.weight,
                                  "node": b.node} for b in s.backends],
                })
    return out


def _unusable(results) -> bool:
    """A file from which no listing was read: nothing to check (issue 8: no silent pass), said
    on stderr."""
    empty = [r.dump.path for r in results if not r.dump.listings]
    for path in empty:
        sys.stderr.write(f"synack: error: {path}: no Cilium listing read: nothing to check\n")
    return bool(empty)


def cmd_parse(args) -> int:
    from analyzer.report.diagnostics import render_json, render_text_all

    results = load(args)
    if results is None:
        return EXIT_UNUSABLE
    diags = sorted((d for r in results for d in r.diagnostics), key=lambda d: d.sort_key())
    errors = sum(1 for d in diags if d.severity == Severity.ERROR)
    if args.output_format == "json":
        sys.stdout.write(render_json(diags, {"model": {**summary(results), "services": services_json(results)}})
                         + "\n")
    elif args.output_format == "save":
        sys.stderr.write("synack: error: -o save writes iptables rules; a Cilium dump has none\n")
        return EXIT_UNUSABLE
    else:
        if diags:
            sys.stdout.write(render_text_all(diags) + "\n")
        if not args.quiet:
            for r in results:
                parts = []
                for x in r.dump.listings:
                    what = x.kind + (f" {x.section}" if x.section else "")
                    if x.services:
                        what += f" ({len(x.services)} services, {sum(len(s.backends) for s in x.services)} backends)"
                    elif x.backends:
                        what += f" ({len(x.backends)} backends)"
                    elif x.revnat:
                        what += f" ({len(x.revnat)} rev-NAT entries)"
                    elif x.service_meta:
                        what += f" ({len(x.service_meta)} services)"
                    elif x.status is not None:
                        st = x.status
                        what += " (" + ", ".join(f"{k}={v}" for k, v in (
                            ("version", st.version), ("kpr", st.kpr), ("socket-lb", st.socket_lb),
                            ("mode", st.lb_mode), ("host-routing", st.host_routing)) if v is not None) + ")"
                    parts.append(what)
                sys.stdout.write(f"{r.dump.path}: cilium {r.format}: {'; '.join(parts) or 'nothing read'}; "
                                 f"{r.errors} error(s), "
                                 f"{sum(1 for d in r.diagnostics if d.severity == Severity.WARNING)} warning(s)\n")
    if _unusable(results):
        return EXIT_UNUSABLE
    return EXIT_FINDINGS if errors else EXIT_OK


def cmd_lint(args, select, ignore) -> list | None:
    """The diagnostics of lint on Cilium dumps (parse diagnostics included), or None if unusable."""
    from analyzer.checks import CheckContext, selected
    from analyzer.checks.cilium import run_cilium_checks

    results = load(args)
    if results is None:
        return None
    diags = [d for r in results for d in r.diagnostics if selected(d.code, None, select, ignore)]
    ctx = CheckContext(None, tuple(f for r in results for f in r.files),
                       extra={"cilium": tuple(r.dump for r in results), "node": getattr(args, "node", None)})
    diags += run_cilium_checks(ctx, select, ignore)
    if _unusable(results):
        from analyzer.report.diagnostics import render_text_all
        sys.stderr.write(render_text_all(diags) + "\n")
        return None
    return diags
