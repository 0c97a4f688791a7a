"""Command line: argument parsing and exit codes only; the work happens in parse/checks/engine.

Exit codes (as ruff): 0 clean, 1 findings at or above --fail-on, 2 unusable input or usage error.
"""
from __future__ import annotations

import argparse
import sys

from analyzer import __version__
from analyzer.diagnostics import Severity
from analyzer.model.rules import TABLES

EXIT_OK, EXIT_FINDINGS, EXIT_UNUSABLE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2, like argparse, with a hint
        self.print_usage(sys.stderr)
        sys.stderr.write(f"synack: error: {message}\n")
        raise SystemExit(EXIT_UNUSABLE)


def _input_args(p):
    p.add_argument("dumps", nargs="*", metavar="DUMP",
                   help="iptables-save / ip6tables-save (both in one file too) / iptables-restore / "
                        "`iptables -S` / command-list file, or Cilium dumps (service list, bpf lb list, "
                        "statedb tables, status: docs/cilium.md); '-' reads stdin. Several files are "
                        "separate dumps, each checked on its own (see --apply-in-order)")
    p.add_argument("--format", dest="fmt", choices=["auto", "save", "S", "cmd", "cilium"], default="auto",
                   help="input format (default: detected)")
    p.add_argument("--family", type=int, choices=[4, 6],
                   help="address family (default: detected; with a file of both, keep only this one)")
    p.add_argument("--table", choices=list(TABLES),
                   help="table of an `iptables -S` dump (default: inferred from its chains and targets)")
    p.add_argument("--apply-in-order", action="store_true",
                   help="several files are one host's successive iptables-restore --noflush "
                        "transactions (kube-proxy's way): apply them in order, check the result")
    p.add_argument("--noflush", action="store_true",
                   help="the input is iptables-restore --noflush transactions (chains may exist "
                        "from earlier ones); with several files, implies --apply-in-order")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept input whose tables hold no rule (only chain policies) instead of "
                        "refusing it as nothing to check")
    p.add_argument("--ipset", action="append", default=[], metavar="FILE",
                   help="`ipset save` output of the namespace: its sets are known (no PRS103), "
                        "and explain evaluates -m set matches exactly")
    p.add_argument("--strict", action="store_true", help="stop at the first error")
    p.add_argument("--live", action="store_true",
                   help="read this machine's rules with iptables-save (read-only) instead of a file")
    p.add_argument("--netns", metavar="NAME", help="with --live: read the rules of this network namespace")
    p.add_argument("--backend", choices=["auto", "nft", "legacy", "iptc"], default="auto",
                   help="with --live: which iptables backend to read (iptc = python-iptables, legacy only)")


def _config_args(p):
    p.add_argument("--config", metavar="FILE", help="synack.toml or pyproject.toml to use instead of the "
                                                      "nearest one above the input (docs/ci.md)")
    p.add_argument("--isolated", action="store_true", help="ignore configuration files")


def _configure(args) -> int | None:
    """Settings from the nearest configuration (synack.toml / [tool.synack]) under the command
    line's: --select replaces the configured selection, --ignore adds to it; the suppressor that
    lint and check apply. An unusable configuration is exit 2."""
    from analyzer.policy.config import ConfigError, Suppressor, find_config, load_config

    cfg = None
    if not args.isolated:
        start = next(iter(getattr(args, "dumps", None) or []), None) or getattr(args, "env", None) \
            or getattr(args, "policy", None)
        try:
            cfg = load_config(args.config) if args.config else find_config(None if start == "-" else start)
        except ConfigError as e:
            return _error(str(e))
        if args.config and cfg is None:
            return _error(f"{args.config}: no [tool.synack] table")
    args.config_used = cfg
    if cfg is not None:
        if hasattr(args, "select") and not args.select:
            args.select = list(cfg.select)
        if hasattr(args, "ignore"):
            args.ignore = list(cfg.ignore) + list(args.ignore)
        if args.fail_on is None:
            args.fail_on = cfg.fail_on
        if cfg.env and not args.dumps and not getattr(args, "env", None) and not getattr(args, "live", False) \
                and args.command == "lint":
            args.env = cfg.env
    if args.fail_on is None:
        args.fail_on = "info" if args.command == "check" else "warning"
    args.suppressor = Suppressor(cfg)
    return None


def _suppress(args, diags, env, results, select, ignore):
    """Drop suppressed diagnostics; add POL002 for suppressions that silenced nothing."""
    from analyzer.checks import selected

    sup = args.suppressor
    if env is not None:
        sup.add_env(env)
    for res in results:
        for f in res.files:
            sup.add_dump(f.path, f.lines)
    kept = sup.filter(diags)
    ran = lambda c: selected(c, None, select, ignore) and (env is not None or not c.startswith("NAT"))  # noqa: E731
    unused = [d for d in sup.unused(ran) if selected(d.code, d.name, None, ignore)]  # unless ignored
    return kept + sorted(unused, key=lambda d: d.sort_key())


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="synack", description="Follow a flow through iptables/NAT forward and back.")
    ap.add_argument("--version", action="version", version=f"synack {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("parse", help="parse dumps into the model; report what iptables-restore would refuse")
    _input_args(p)
    p.add_argument("--output-format", "-o", choices=["text", "json", "save"], default="text",
                   help="text summary, JSON model summary, or the model written back as iptables-save")
    p.add_argument("--quiet", "-q", action="store_true", help="print diagnostics only")
    p.add_argument("--no-group", action="store_true",
                   help="list every occurrence of a repeated diagnostic (default: one per file with a count)")

    p = sub.add_parser("lint", help="structural and translation checks")
    _input_args(p)
    p.add_argument("--output-format", "-o", choices=["text", "json", "sarif"], default="text",
                   help="text (default), JSON (with schema_version) or SARIF 2.1.0 for code scanning")
    p.add_argument("--no-group", action="store_true",
                   help="list every occurrence of a repeated diagnostic (default: one per file with a count)")
    p.add_argument("--select", action="append", default=[], help="only these codes/prefixes/names (comma list)")
    p.add_argument("--ignore", action="append", default=[], help="skip these codes/prefixes/names (comma list)")
    _config_args(p)
    p.add_argument("--fail-on", choices=["error", "warning", "info"], default=None,
                   help="lowest severity that makes the exit code 1 (default: warning)")
    p.add_argument("--env", metavar="ENV.yaml",
                   help="environment of several namespaces (docs/environment.md): also follow every "
                        "service both ways and report replies that bypass translation (NAT checks)")
    p.add_argument("--node", metavar="NAME",
                   help="Cilium dumps: the node they were taken on (CIL004 compares the backends' nodes with it)")

    p = sub.add_parser("explain", help="trace one flow through the rules, both directions")
    _input_args(p)
    p.add_argument("--flow", required=True, help="e.g. 'tcp 10.4.26.45:35582 -> 10.4.26.234:80'; "
                   "a TCP packet other than the first SYN: append 'flags ACK' (or RST, FIN,ACK ...)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--from-iface", help="interface the packet arrives on (PREROUTING path)")
    g.add_argument("--local", action="store_true", help="generated by a local process (OUTPUT path)")
    p.add_argument("--uid", type=int, help="owner uid of the local process (with --local)")
    p.add_argument("--gid", type=int, help="owner gid of the local process (with --local)")
    p.add_argument("--mark", type=lambda s: int(s, 0), default=0, help="packet mark on arrival")
    p.add_argument("--addr", action="append", default=[], metavar="CIDR@IFACE",
                   help="an address of this namespace, e.g. 10.0.0.1/24@eth0")
    p.add_argument("--route", action="append", default=[], metavar="'DEST [via GW] dev IFACE'",
                   help="a route of this namespace (ip route syntax)")
    p.add_argument("--iproute", nargs=2, metavar=("ADDR", "ROUTE"),
                   help="files with `ip addr` and `ip route` output of the namespace (as printed, or `ip -j`)")
    p.add_argument("--sysctl", action="append", default=[], metavar="KEY=VALUE",
                   help="a sysctl of the namespace, e.g. net.netfilter.nf_conntrack_tcp_loose=0")
    p.add_argument("--env", metavar="ENV.yaml", help="follow the flow across the namespaces of an environment")
    p.add_argument("--from", dest="start", metavar="NAMESPACE",
                   help="with --env: the namespace whose process opens the connection")
    p.add_argument("--output-format", "-o", choices=["text", "json"], default="text",
                   help="text trace (default) or JSON")

    p = sub.add_parser("check", help="check a policy of assertions (docs/policy.md) against dumps or an environment")
    p.add_argument("policy", metavar="POLICY.yaml", help="policy file (docs/policy.md)")
    _input_args(p)
    p.add_argument("--env", metavar="ENV.yaml", help="check against an environment of several namespaces")
    p.add_argument("--addr", action="append", default=[], metavar="CIDR@IFACE",
                   help="an address of the dump's namespace (adds to the policy's target.addresses)")
    p.add_argument("--route", action="append", default=[], metavar="'DEST [via GW] dev IFACE'",
                   help="a route of the dump's namespace (adds to the policy's target.routes)")
    p.add_argument("--output-format", "-o", choices=["text", "json", "sarif", "junit"], default="text",
                   help="text (default), JSON, SARIF 2.1.0 or JUnit XML")
    p.add_argument("--output-file", metavar="FILE", help="write the report here instead of stdout")
    _config_args(p)
    p.add_argument("--fail-on", choices=["error", "warning", "info"], default=None,
                   help="lowest severity of a failing assertion that makes the exit code 1 (default: info, any)")
    p.add_argument("--quiet", "-q", action="store_true", help="text: show failing assertions only")

    p = sub.add_parser("diff", help="which flows change fate between two dumps or two environments")
    p.add_argument("old", metavar="OLD", help="dump, or environment file (.yaml)")
    p.add_argument("new", metavar="NEW", help="dump, or environment file (.yaml)")
    p.add_argument("--from-iface", help="dumps: the interface arriving packets come in on")
    p.add_argument("--addr", action="append", default=[], metavar="CIDR@IFACE",
                   help="dumps: an address of the namespace both dumps stand for")
    p.add_argument("--route", action="append", default=[], metavar="'DEST [via GW] dev IFACE'",
                   help="dumps: a route of that namespace")
    p.add_argument("--limit", type=int, default=256, help="most classes explored per entry (default 256)")
    p.add_argument("--verbose", "-v", action="store_true", help="text: print both traces of each witness")
    p.add_argument("--output-format", "-o", choices=["text", "json", "sarif"], default="text",
                   help="text (default), JSON or SARIF 2.1.0")

    p = sub.add_parser("checks", help="list every diagnostic code synack can report")
    p.add_argument("--output-format", "-o", choices=["text", "json"], default="text",
                   help="a table (default) or JSON with each code's docs URL")
    return ap


def _split(values):
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _error(message: str) -> int:
    sys.stderr.write(f"synack: error: {message}\n")
    return EXIT_UNUSABLE


def _usage_problem(args) -> str | None:
    """Options that would be silently ignored, or that contradict each other: a usage error
    (exit 2) rather than an answer to a question the user did not ask."""
    live, env, dumps = getattr(args, "live", False), getattr(args, "env", None), args.dumps
    if live and dumps:
        return "--live reads this machine's rules: give either --live or DUMP files, not both"
    if not live:
        if getattr(args, "netns", None):
            return "--netns NAME only applies to --live (a dump file is read as it is)"
        if getattr(args, "backend", "auto") != "auto":
            return f"--backend {args.backend} only applies to --live"
    if env:
        with_env = [name for name, given in (
            ("DUMP", dumps), ("--live", live), ("--from-iface", getattr(args, "from_iface", None)),
            ("--local", getattr(args, "local", False)), ("--addr", getattr(args, "addr", None)),
            ("--route", getattr(args, "route", None)), ("--iproute", getattr(args, "iproute", None)),
            ("--ipset", getattr(args, "ipset", None))) if given]
        if with_env:
            return (f"{', '.join(with_env)} cannot be combined with --env: the environment file gives "
                    "each namespace its rules, addresses and routes"
                    + (" (start the flow with --from NAMESPACE)" if "--from-iface" in with_env
                       or "--local" in with_env else ""))
    elif getattr(args, "start", None):
        return "--from NAMESPACE only applies with --env ENV.yaml; for a dump, say where the packet " \
               "comes from with --from-iface IFACE or --local"
    for spec in getattr(args, "addr", None) or ():
        cidr, at, iface = spec.partition("@")
        if not at or not iface or not cidr:
            return f"--addr {spec}: give the interface too, as CIDR@IFACE (e.g. 10.0.0.1/24@eth0)"
    if (getattr(args, "uid", None) is not None or getattr(args, "gid", None) is not None) \
            and not getattr(args, "local", False) and not env:  # with --env: the --from process
        return "--uid/--gid describe a local process: use them with --local"
    if getattr(args, "apply_in_order", False) and len(dumps) < 2 and not live:
        return "--apply-in-order applies several DUMP files in order: give two or more"
    return None


def _read_inputs(args) -> list[tuple[str, str]] | None:
    """(text, display path) of every input, each of a kind the iptables parser reads; None after
    an error message (a missing file, nothing read, input of another kind)."""
    from analyzer.parse.kinds import identify

    inputs = []
    if getattr(args, "live", False):
        from analyzer.parse.live import LiveError, read_live
        try:
            inputs.append(read_live(args.family or 4, args.backend, args.netns))
        except LiveError as e:
            _error(str(e))
            return None
    for path in args.dumps:
        try:
            if path == "-":
                inputs.append((sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "<stdin>"))
            else:
                with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                    inputs.append((f.read(), path))
        except OSError as e:
            _error(f"cannot read {path}: {e.strerror}")
            return None
        except UnicodeDecodeError:  # surrogateescape decodes any bytes; kept for safety
            _error(f"cannot read {path}: not text")
            return None
    for text, path in inputs:
        kind = identify(text)
        if kind.iptables:
            continue
        msg = kind.message
        if kind.name == "empty" and path.startswith("<live"):
            msg = (f"iptables-save printed nothing: no table is loaded in this backend "
                   f"({path[1:-1]}); the rules may live in the other one (try --backend "
                   "nft or --backend legacy), or iptables-save lacked root")
        _error(f"{path}: {msg}")
        return None
    return inputs


def _ipset_names(args) -> frozenset | None:
    from analyzer.parse.ipset import load_ipsets

    names = set()
    for path in getattr(args, "ipset", None) or ():
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                sets, _ = load_ipsets(f.read(), path)
        except OSError as e:
            _error(f"--ipset {path}: cannot read it: {e.strerror}")
            return None
        names.update(sets)
    return frozenset(names)


def _load(args, lazy: bool = False):
    """The parse results to check: one per DUMP file (each a dump of its own), or one for all of
    them with --apply-in-order / --noflush; None after an error message."""
    from analyzer.parse import StrictError, load_ruleset

    inputs = _read_inputs(args)
    if inputs is None:
        return None
    ipsets = _ipset_names(args)
    if ipsets is None:
        return None
    together = args.apply_in_order or (args.noflush and len(inputs) > 1)
    units = [inputs] if together else [[i] for i in inputs]
    results = []
    for unit in units:
        try:
            res = load_ruleset(unit, fmt=None if args.fmt == "auto" else args.fmt, family=args.family,
                               noflush=args.noflush or together, strict=args.strict, table=args.table,
                               lazy=lazy, ipsets=ipsets)
        except StrictError as e:
            from analyzer.diagnostics import render_text
            sys.stderr.write(render_text(e.diagnostic) + "\n")
            sys.stderr.write("synack: stopped at the first error (--strict)\n")
            return None
        if args.table and res.format == "save":
            _error(f"--table {args.table} names the table of `iptables -S` input; "
                   f"{', '.join(p for _, p in unit)} is iptables-save output with its own '*table' lines")
            return None
        results.append(res)
    return results


def _nothing_read(res, allow_empty: bool) -> str | None:
    """Why the input gives nothing to check, or None: no table and no rule (the message says what
    was there instead), or tables with only chain policies (unless --allow-empty)."""
    if res.rule_count():
        return None
    sources = ", ".join(res.ruleset.sources) or "the input"
    if not res.table_count():
        return f"{sources}: no table and no rule read: nothing to check"
    if allow_empty:
        return None
    tables = ", ".join(t for r in res.families() for t in r.ruleset.tables)
    return (f"{sources}: no rule read, only the chain policies of {tables}: nothing to check "
            "(--allow-empty accepts an empty ruleset)")


def _partial(res, args) -> bool:
    """Chains may exist outside this input: a fragment, a --noflush transaction, files applied in
    order, or a dump cut short (PRS010 at its end)."""
    return res.format in ("S", "cmd") or args.noflush or args.apply_in_order or res.truncated


def _truncation_first(diags):
    """Per file, the diagnostic saying the input was cut short comes before what follows from it."""
    def key(d):
        trunc = d.code == "PRS010" and "truncated" in d.message
        return (d.span.path if d.span else "", not trunc, d.sort_key())
    return sorted(diags, key=key)


def cmd_parse(args) -> int:
    from analyzer.checks import CheckContext, run_checks
    from analyzer.report.diagnostics import render_json, render_text_all

    problem = _usage_problem(args)
    if problem:
        return _error(problem)
    if not _need_dumps(args):
        return EXIT_UNUSABLE
    from analyzer import cli_cilium
    if cli_cilium.is_cilium(args):
        return cli_cilium.cmd_parse(args)
    results = _load(args)
    if results is None:
        return EXIT_UNUSABLE
    diags, empty = [], []
    for res in results:
        diags += res.all_diagnostics
        for r in res.families():
            diags += run_checks(CheckContext(r.ruleset, r.files, partial=_partial(res, args)),
                                restore_only=True)
        why = _nothing_read(res, args.allow_empty)
        if why:
            empty.append(why)
    diags = _truncation_first(diags)
    errors = sum(d.count for d in diags if d.severity == Severity.ERROR)
    if not args.no_group:
        from analyzer.diagnostics import group
        diags = group(diags)
    if args.output_format == "save":
        from analyzer.model.save import to_save
        for res in results:
            for r in res.families():
                sys.stdout.write(to_save(r.ruleset))
        if diags:
            sys.stderr.write(render_text_all(diags) + "\n")
    elif args.output_format == "json":
        sums = [_summary(res) for res in results]
        sys.stdout.write(render_json(diags, {"model": sums[0], "inputs": sums}) + "\n")
    else:
        if diags:
            from analyzer.report.terminal import write
            write(render_text_all(diags) + "\n")
        if not args.quiet:
            for res in results:
                s = _summary(res)
                mine = [d for d in diags if d.span and d.span.path in s["sources"]]
                fams = "; ".join(
                    f"IPv{f['family']}: " + (", ".join(f"{t['name']} ({t['chains']} chains, {t['rules']} rules)"
                                                     for t in f["tables"]) or "no tables")
                    for f in s["families"])
                sys.stdout.write(f"{', '.join(s['sources'])}: {s['format']} format, {fams}; "
                                 f"{sum(d.count for d in mine if d.severity == Severity.ERROR)} error(s), "
                                 f"{sum(d.count for d in mine if d.severity == Severity.WARNING)} warning(s)\n")
    for why in empty:
        _error(why)
    if empty:
        return EXIT_UNUSABLE
    return EXIT_FINDINGS if errors else EXIT_OK


def _summary(res) -> dict:
    """One input's model: its sources, format and, per address family, its tables. ``family`` and
    ``tables`` are those of the first family (IPv4 when the input holds both)."""
    fams = []
    for r in res.families():
        rs = r.ruleset
        fams.append({"family": rs.family,
                     "tables": [{"name": t.name, "chains": len(t.chains),
                                 "rules": sum(len(c.rules) for c in t.chains.values())}
                                for t in rs.tables.values()],
                     "approximate_rules": sum(1 for x in rs.rules() if not x.modelled)})
    return {"sources": list(res.ruleset.sources), "format": res.format, "family": fams[0]["family"],
            "tables": fams[0]["tables"], "approximate_rules": sum(f["approximate_rules"] for f in fams),
            "families": fams, "truncated": res.truncated}


def _load_env(path, warn: bool = True):
    """The environment, or None after saying why on stderr. ``warn``: also print its ENV
    warnings there (lint reports them as findings instead)."""
    from analyzer.netfilter.env import EnvError
    from analyzer.parse.envfile import ENV_CODES, load_environment

    try:
        env = load_environment(path)
    except (EnvError, ValueError) as e:
        sys.stderr.write("".join(f"synack: error: {line}\n" for line in str(e).splitlines()))
        return None
    if warn:
        for d in env.diagnostics:
            if d.code in ENV_CODES:
                sys.stderr.write(f"synack: warning: {d.span.render()}: {d.code} {d.message}\n")
    return env


def _need_dumps(args) -> bool:
    if not args.dumps and not getattr(args, "env", None) and not getattr(args, "live", False):
        sys.stderr.write("synack: error: give a DUMP ('-' for stdin), --live, or --env ENV.yaml\n")
        return False
    return True


def _selection(args, known: dict[str, str]) -> tuple[list, list] | str:
    """--select/--ignore as codes and code prefixes, case-insensitive; a check name stands for its
    code. An unknown entry is a usage error with the nearest codes (ruff's behaviour); selecting
    only environment checks (NAT) without --env too."""
    import difflib

    names = {n.lower(): c for c, n in known.items()}
    out = []
    for opt, values in (("--select", args.select), ("--ignore", args.ignore)):
        codes = []
        for v in _split(values):
            u = v.upper()
            if v.lower() in names:
                codes.append(names[v.lower()])
            elif u == "ALL":
                codes.append("")
            elif any(c.startswith(u) for c in known) and u[:1].isalpha():
                codes.append(u)
            else:
                near = difflib.get_close_matches(u, list(known), n=3, cutoff=0.6) or \
                    [known_code for n, known_code in names.items()
                     if n in difflib.get_close_matches(v.lower(), list(names), n=1, cutoff=0.6)]
                hint = f"; did you mean {', '.join(repr(x) for x in near)}?" if near else ""
                return (f"{opt} {v}: no check has this code or name{hint} "
                        "(`synack checks` lists them)")
        out.append(codes)
    select, ignore = out
    if select and not getattr(args, "env", None):
        # an environment check (NAT...) follows flows across namespaces: a dump alone has none
        env_only = [c for c in select if c and all(k.startswith("NAT") for k in known if k.startswith(c))]
        if env_only and len(env_only) == len(select):
            return (f"--select {','.join(env_only)}: environment checks follow flows across "
                    "namespaces and need --env ENV.yaml")
    return select, ignore


def cmd_lint(args) -> int:
    from analyzer.checks import CheckContext, load_all, run_checks, selected
    from analyzer.codes import all_codes
    from analyzer.report.diagnostics import render_json, render_sarif, render_text_all

    problem = _usage_problem(args)
    if problem:
        return _error(problem)
    if not _need_dumps(args):
        return EXIT_UNUSABLE
    load_all()
    known = {c: i.name for c, i in all_codes().items()}
    sel = _selection(args, known)
    if isinstance(sel, str):
        return _error(sel)
    select, ignore = sel
    diags = []
    coverage = None
    results = []
    from analyzer.checks import REGISTRY
    from analyzer.report.terminal import progress
    n_checks = sum(1 for c, i in REGISTRY.items() if selected(c, i.name, select, ignore))
    if args.env:
        env = _load_env(args.env, warn=False)
        if env is None:
            return EXIT_UNUSABLE
        diags += [d for d in env.diagnostics if selected(d.code, None, select, ignore)]
        rulesets = [rs for spec in env.namespaces.values() for rs in (spec.ruleset, spec.ruleset6) if rs is not None]
        with progress(len(rulesets) * n_checks + 1, "checking") as tick:  # stderr, terminal only
            for rs in rulesets:
                diags += [d for d in run_checks(CheckContext(rs, ()), select, ignore, on_check=tick)
                          if not d.code.startswith("NAT")]
            env_ctx = CheckContext(None, (), extra={"env": env})
            diags += run_checks(env_ctx, select or ["NAT"], ignore, on_check=tick)
        coverage = env_ctx.extra.get("coverage")
    empty = []
    from analyzer import cli_cilium
    cilium = bool(args.dumps) and cli_cilium.is_cilium(args)
    if cilium:
        found = cli_cilium.cmd_lint(args, select, ignore)
        if found is None:
            return EXIT_UNUSABLE
        diags += found
    elif args.dumps or args.live:
        results = _load(args)
        if results is None:
            return EXIT_UNUSABLE
        with progress(sum(len(list(res.families())) for res in results) * n_checks, "checking") as tick:
            for res in results:
                diags += [d for d in res.all_diagnostics if selected(d.code, None, select, ignore)]
                for r in res.families():
                    diags += run_checks(CheckContext(r.ruleset, r.files, partial=_partial(res, args)),
                                        select, ignore, on_check=tick)
                why = _nothing_read(res, args.allow_empty)
                if why:
                    empty.append(why)
    diags = _truncation_first(_suppress(args, diags, env if args.env else None, results, select, ignore))
    if not args.no_group:
        from analyzer.diagnostics import group
        diags = group(diags)
    if args.output_format == "json":
        if results:
            sums = [_summary(res) for res in results]
            extra = {"summary": sums[0], "inputs": sums}
        elif cilium:
            extra = {"inputs": list(args.dumps)}
        else:
            extra = {"env": args.env}
        if coverage is not None:
            extra["coverage"] = coverage
        out = render_json(diags, extra)
    elif args.output_format == "sarif":
        out = render_sarif(diags, all_codes())
    elif empty and not diags:
        out = None  # not "No findings.": nothing was checked
    else:
        out = render_text_all(diags, summary={})
        if coverage is not None:
            out = f"{out}\n{_coverage_text(coverage)}"
    if out is not None:
        if args.output_format == "text":
            from analyzer.report.terminal import write
            write(out + "\n")  # colour on a terminal only
        else:
            sys.stdout.write(out + "\n")
    for why in empty:
        _error(why)
    if empty:
        return EXIT_UNUSABLE
    floor = {"error": Severity.ERROR, "warning": Severity.WARNING, "info": Severity.INFO}[args.fail_on]
    return EXIT_FINDINGS if any(d.severity >= floor for d in diags) else EXIT_OK


def _coverage_text(c: dict) -> str:
    """What lint --env followed and what it could not (the same counts are in the JSON)."""
    s = lambda n, w: f"{n} {w}{'' if n == 1 else 's'}"
    text = (f"Covered: {s(c['services'], 'service')} x {s(c['clients'], 'client')} = {s(c['flows'], 'flow')}, "
            f"{s(c['endpoints'], 'endpoint')} ({s(c['outcomes'], 'outcome')}), requests and replies "
            f"({c['requests_delivered']} requests delivered, {c['replies_followed']} replies followed).")
    text += (f"\nNot covered: {c['never_arrived']} requests never arrived anywhere "
             f"({c['unreachable_listeners']} of them to untranslated listeners, not flagged), "
             f"{c['left_environment']} left the environment, "
             f"{c['branches_not_followed']} branches over the cap of {c['max_outcomes']} not followed.")
    return text


def cmd_checks(args) -> int:
    import json
    import shutil
    import textwrap

    from analyzer.codes import all_codes

    codes = all_codes().values()
    if args.output_format == "json":
        print(json.dumps([dict(code=c.code, name=c.name, severity=c.severity, summary=c.summary,
                               docs=c.help_uri) for c in codes], indent=2))
        return EXIT_OK
    width = max(60, shutil.get_terminal_size((100, 20)).columns - 1)
    name_w = max(len(c.name) for c in codes)
    indent = " " * (8 + name_w + 2 + 9)
    for c in codes:  # the whole summary, wrapped under its column: never cut mid-sentence
        head = f"{c.code}  {c.name:<{name_w}}  {c.severity:<8} "
        print(textwrap.fill(c.summary, width=width, initial_indent=head, subsequent_indent=indent,
                            break_on_hyphens=False, break_long_words=False))
    print("\nEach code's page: docs/checks/CODE.md, docs/parse-errors.md (PRS), docs/environment.md (ENV).")
    return EXIT_OK


def cmd_explain(args) -> int:
    from analyzer.explain import run_explain

    problem = _usage_problem(args)
    if problem:
        return _error(problem)
    if args.env:
        return cmd_explain_env(args)
    if not _need_dumps(args):
        return EXIT_UNUSABLE
    if len(args.dumps) > 1 and not (args.apply_in_order or args.noflush):
        return _error("explain walks one namespace's rules: give one DUMP (it may hold both "
                      "iptables-save and ip6tables-save output), or --apply-in-order to apply "
                      "several files in order")
    from analyzer.symbolic import parse_flow_spec

    try:
        spec = parse_flow_spec(args.flow)
        if spec.open & {"src", "dst"}:
            raise ValueError("open addresses are not explained yet: give single addresses")
    except ValueError as e:
        return _error(str(e))
    # explain decodes only the rules the flow meets (run lint to validate the whole dump)
    results = _load(args, lazy=True)
    if results is None:
        return EXIT_UNUSABLE
    res = results[0]
    if not res.table_count() or (not res.rule_count() and res.errors):
        from analyzer.report.diagnostics import render_text_all
        sys.stderr.write(render_text_all([d for d in res.all_diagnostics if d.severity == Severity.ERROR]) + "\n")
        return _error("nothing to explain: the input has no usable table or rule")
    family = spec.template.family
    mine = res.for_family(family)
    if mine is None:
        held = ", ".join(f"IPv{r.ruleset.family}" for r in res.families())
        return _error(f"the flow is IPv{family}, but {', '.join(res.ruleset.sources)} holds only {held} "
                      f"rules: give {'ip6tables-save' if family == 6 else 'iptables-save'} output (both "
                      f"families may be in one file), or --family {family} if the dump is of that family")
    from dataclasses import replace
    mine = replace(mine, others=())  # the flow's own family: the other one plays no part
    if spec.open:
        return cmd_explain_open(args, mine, spec)
    return run_explain(args, mine)


def cmd_explain_open(args, res, spec) -> int:
    """A flow with open protocol/ports: every packet it stands for, grouped by outcome."""
    import json
    from dataclasses import replace

    from analyzer.explain import build_namespace, render_json
    from analyzer.netfilter.env import EnvError
    from analyzer.symbolic import explain_open_flow, render_groups

    try:
        ns = build_namespace(args)
    except (EnvError, ValueError, OSError) as e:
        sys.stderr.write(f"synack: error: {e}\n")
        return EXIT_UNUSABLE
    t = spec.template
    if args.local:
        t = replace(t, uid=args.uid, gid=args.gid, mark=args.mark)
        where = "generated locally"
    else:
        t = replace(t, iif=args.from_iface, mark=args.mark)
        where = f"arrives on {args.from_iface}" if args.from_iface else "arrives on an unnamed interface"
    spec = replace(spec, template=t)
    groups, complete = explain_open_flow(res.ruleset, spec, ns, local=args.local)
    from analyzer.explain import report_late_errors
    report_late_errors(res)
    if args.output_format == "json":
        doc = {"schema_version": "1.0", "open_fields": sorted(spec.open), "complete": complete,
               "groups": [{"packets": g.description, "classes": g.classes,
                           "explain": json.loads(render_json(g.witness, g.outcomes))} for g in groups]}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(render_groups(spec, groups, complete, where))
    return EXIT_OK


def cmd_explain_env(args) -> int:
    import json
    from dataclasses import replace

    from analyzer.crosshost import World, follow_all, outcome_findings, render_trips, trips_json
    from analyzer.netfilter.walk import parse_flow

    env = _load_env(args.env)
    if env is None:
        return EXIT_UNUSABLE
    if not args.start or args.start not in env.namespaces:
        sys.stderr.write(f"synack: error: --from NAMESPACE is required with --env "
                         f"(one of: {', '.join(env.namespaces)})\n")
        return EXIT_UNUSABLE
    try:
        flow = parse_flow(args.flow)
    except ValueError as e:
        sys.stderr.write(f"synack: error: {e}\n")
        return EXIT_UNUSABLE
    flow = replace(flow, mark=args.mark)
    world = World(env)
    trips = follow_all(world, args.start, flow, uid=args.uid, gid=args.gid)
    diags = outcome_findings(world, trips)
    if args.output_format == "json":
        sys.stdout.write(json.dumps(trips_json(trips, diags), indent=2) + "\n")
    else:
        sys.stdout.write(render_trips(trips, diags))
    return EXIT_FINDINGS if diags else EXIT_OK


def cmd_check(args) -> int:
    import os

    from analyzer.netfilter.env import EnvError
    from analyzer.policy.adapter import DumpTarget, EnvTarget, make_namespace
    from analyzer.policy.evaluate import evaluate
    from analyzer.policy.spec import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        sys.stderr.write(e.render() + "\n")
        return EXIT_UNUSABLE
    tgt = policy.target
    if not args.dumps and not args.env and not args.live:
        cfg = args.config_used
        if tgt.get("env"):
            args.env = policy.resolve(tgt["env"])
        elif tgt.get("dumps"):
            args.dumps = [policy.resolve(d) for d in tgt["dumps"]]
        elif cfg is not None and cfg.env:
            args.env = cfg.env
        else:
            sys.stderr.write("synack: error: give DUMP..., --env ENV.yaml, or name one in the policy's target:\n")
            return EXIT_UNUSABLE
    try:
        if args.env:
            env = _load_env(args.env)
            if env is None:
                return EXIT_UNUSABLE
            target = EnvTarget(env, args.env)
        else:
            results = _load(args)
            if results is None:
                return EXIT_UNUSABLE
            if len(results) > 1:
                return _error("a policy checks one namespace's rules: give one DUMP (it may hold "
                              "both families), or --apply-in-order to apply several files in order")
            res = results[0]
            why = _nothing_read(res, args.allow_empty)
            if why:
                from analyzer.report.diagnostics import render_text_all
                errs = [d for d in res.all_diagnostics if d.severity == Severity.ERROR]
                if errs:
                    sys.stderr.write(render_text_all(errs) + "\n")
                return _error(why)
            ns = make_namespace(list(tgt.get("addresses", [])) + args.addr,
                                list(tgt.get("routes", [])) + args.route, tgt.get("sysctls"))
            target = DumpTarget(res.ruleset, ns, ", ".join(args.dumps) or "live", res.files, res)
    except (EnvError, ValueError, OSError) as e:
        sys.stderr.write(f"synack: error: {e}\n")
        return EXIT_UNUSABLE
    target.suppressor = args.suppressor
    results = evaluate(policy, target)
    fmt = args.output_format
    if fmt == "json":
        from analyzer.report.policy import render_json as render
    elif fmt == "sarif":
        from analyzer.report.policy import render_sarif as render
    elif fmt == "junit":
        from analyzer.report.junit import render_junit as render
    else:
        from analyzer.report.policy import render_text
        render = lambda r, p, t: render_text(r, p, t, verbose=not args.quiet)  # noqa: E731
    out = render(results, args.policy, target.label)
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            f.write(out if out.endswith("\n") else out + "\n")
        if fmt != "text":
            from analyzer.report.policy import summary_line
            sys.stderr.write(summary_line(results) + "\n")
    else:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
    for r in results:
        if r.status == "error":
            sys.stderr.write(f"synack: error: {args.policy}:{r.assertion.span.line}: "
                             f"'{r.assertion.name}' {r.message}\n")
    if any(r.status == "error" for r in results):
        return EXIT_UNUSABLE
    floor = {"error": Severity.ERROR, "warning": Severity.WARNING, "info": Severity.INFO}[args.fail_on]
    return EXIT_FINDINGS if any(r.status == "fail" and r.assertion.severity >= floor for r in results) else EXIT_OK


def cmd_diff(args) -> int:
    from analyzer.netfilter.env import EnvError
    from analyzer.parse import load_ruleset
    from analyzer.policy.adapter import DumpTarget, EnvTarget, make_namespace
    from analyzer.policy.diff import diff_dumps, diff_envs

    is_env = [p.endswith((".yaml", ".yml")) for p in (args.old, args.new)]
    if is_env[0] != is_env[1]:
        sys.stderr.write("synack: error: diff two dumps or two environments, not one of each\n")
        return EXIT_UNUSABLE
    try:
        if is_env[0]:
            envs = [_load_env(p) for p in (args.old, args.new)]
            if None in envs:
                return EXIT_UNUSABLE
            res = diff_envs(EnvTarget(envs[0], args.old), EnvTarget(envs[1], args.new), limit=args.limit)
        else:
            ns = make_namespace(args.addr, args.route)
            targets = []
            for path in (args.old, args.new):
                with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                    r = load_ruleset([(f.read(), path)], lazy=True)
                why = _nothing_read(r, True)
                if why:
                    return _error(why)
                targets.append(DumpTarget(r.ruleset, ns, path, r.files, r))
            if targets[0].ruleset.family != targets[1].ruleset.family:
                sys.stderr.write("synack: error: the two dumps are of different address families\n")
                return EXIT_UNUSABLE
            res = diff_dumps(targets[0], targets[1], limit=args.limit, iif=args.from_iface)
    except (EnvError, ValueError, OSError) as e:
        sys.stderr.write(f"synack: error: {e}\n")
        return EXIT_UNUSABLE
    from analyzer.report import diff as rd
    if args.output_format == "json":
        out = rd.render_json(res, args.old, args.new)
    elif args.output_format == "sarif":
        out = rd.render_sarif(res, args.old, args.new)
    else:
        out = rd.render_text(res, args.old, args.new, verbose=args.verbose)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return EXIT_FINDINGS if res.changes else EXIT_OK


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    handler = {"parse": cmd_parse, "lint": cmd_lint, "checks": cmd_checks, "explain": cmd_explain,
               "check": cmd_check, "diff": cmd_diff}[args.command]
    try:
        if args.command in ("lint", "check"):
            bad = _configure(args)
            if bad is not None:
                return bad
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
