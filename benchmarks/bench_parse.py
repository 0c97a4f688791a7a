#!/usr/bin/env python3
"""Benchmark: ``synack parse DUMP --quiet`` vs ``iptables-restore --test DUMP``.

Generates (or takes ``--dump``) the 10,000-service kube-proxy dump, then
times, best of ``--repeat`` runs of each, the two commands alternating so that
both see the same machine load (wall clock from spawn to reap, and CPU time,
user + sys of the child, which a loaded machine inflates far less):

  (a) ``python -m analyzer parse DUMP --quiet`` (cwd = repository root),
      and its peak RSS (``ru_maxrss`` of the child, via ``os.wait4``), with synack's bytecode
      compiled once before the timed runs into a throwaway cache (``PYTHONPYCACHEPREFIX``), as an
      installed synack has it; ``--source-compile`` times it compiling its sources at every run
      instead (what ``PYTHONDONTWRITEBYTECODE=1`` without a cache makes it do: ~0.1 s);
  (b) ``iptables-restore --test < DUMP`` inside a throwaway network namespace
      ``synack-bench-<pid>`` (``unshare -Urn`` if that is not possible).

Targets (issue 11): synack/iptables-restore ratio <= 1.5 (judged on CPU time; the wall ratio
is reported too), synack peak RSS <= 400 MB.

    python benchmarks/bench_parse.py                 # table
    python benchmarks/bench_parse.py --json          # same, JSON
    python benchmarks/bench_parse.py --backend all   # also time nft and legacy
"""
from __future__ import annotations

import argparse
import atexit
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

RATIO_TARGET = 1.5
RSS_TARGET_MB = 400.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", help="use this iptables-save file instead of generating one")
    ap.add_argument("--services", type=int, default=10000, help="generated dump size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    ap.add_argument("--backend", choices=("default", "nft", "legacy", "all"), default="default",
                    help="iptables-restore binary to compare against: 'default' is "
                         "whatever 'iptables-restore' is; 'all' also times nft and "
                         "legacy (the ratio still uses the default)")
    ap.add_argument("--synack-cmd", metavar="CMD",
                    help="override the synack command line (shell-split; {dump} is "
                         "replaced by the dump path), e.g. 'synack parse {dump} --quiet'")
    ap.add_argument("--source-compile", action="store_true",
                    help="let synack compile its Python sources at every run (no bytecode cache) "
                         "instead of compiling them once before the timed runs")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--strict", action="store_true", help="exit 2 if a target is missed")
    a = ap.parse_args(argv)

    try:
        dump = C.ensure_dump(a.dump, services=a.services, seed=a.seed)
    except (OSError, ValueError) as e:
        print(f"bench_parse: {e}", file=sys.stderr)
        return 1
    lines = C.count_lines(dump)
    size_mb = os.path.getsize(dump) / 1e6
    log = (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr, flush=True))
    log(f"dump: {dump} ({lines} lines, {size_mb:.1f} MB)")

    # (a) synack parse
    if a.synack_cmd:
        cmd = [w.replace("{dump}", str(dump)) for w in shlex.split(a.synack_cmd)]
    else:
        cmd = C.synack_cmd("parse", str(dump), "--quiet")
    syn_env: dict[str, str] = {}
    pycache = None
    if not a.source_compile:
        # an installed synack runs from bytecode pip compiled; a checkout under
        # PYTHONDONTWRITEBYTECODE=1 would compile every module at every run
        pycache = tempfile.mkdtemp(prefix="synack-bench-pycache-")
        atexit.register(shutil.rmtree, pycache, ignore_errors=True)
        syn_env = {"PYTHONPYCACHEPREFIX": pycache, "PYTHONDONTWRITEBYTECODE": ""}
        subprocess.run([sys.executable, "-m", "compileall", "-q", "analyzer"], cwd=C.REPO_ROOT,
                       env={**os.environ, **syn_env}, check=False, stdout=subprocess.DEVNULL)
    bytecode = "compiled at every run" if a.source_compile else "compiled once before the runs"
    # (b) iptables-restore --test in a throwaway netns, alternating with (a)
    backends = ["default", "nft", "legacy"] if a.backend == "all" else [a.backend]
    syn_runs: list[C.RunResult] = []
    ipt_runs: dict[str, list[C.RunResult]] = {}
    with C.netns() as sb:
        if sb.note:
            log(f"note: {sb.note}")
        rcmds = {}
        for be in backends:
            try:
                rcmds[be] = sb.wrap(C.iptables_restore_cmd(be))
            except FileNotFoundError as e:
                log(f"skip {be}: {e}")
        log(f"timing: {' '.join(cmd[1:])} and "
            + ", ".join(f"{' '.join(c)} < dump" for c in rcmds.values()) + f", x{a.repeat} alternating")
        for _ in range(max(1, a.repeat)):
            r = C.run_timed(cmd, cwd=C.REPO_ROOT, env=syn_env)
            syn_runs.append(r)
            if not r.ok:
                print(f"bench_parse: synack failed (exit {r.returncode}): {' '.join(cmd)}",
                      file=sys.stderr)
                sys.stderr.write(r.stderr or r.stdout)
                return 1
            for be, rcmd in rcmds.items():
                r = C.run_timed(rcmd, stdin_path=dump, env=sb.env)
                ipt_runs.setdefault(be, []).append(r)
                if not r.ok:
                    print(f"bench_parse: iptables-restore --test ({be}) rejected the dump "
                          f"(exit {r.returncode}):", file=sys.stderr)
                    sys.stderr.write(r.stderr)
                    return 1
    syn = _best(syn_runs)
    ipt = {be: _best(runs) for be, runs in ipt_runs.items()}
    ref_backend = a.backend if a.backend != "all" else "default"
    ref = ipt.get(ref_backend)
    ratio = syn.cpu_seconds / ref.cpu_seconds if ref else None
    wall_ratio = syn.seconds / ref.seconds if ref else None

    t_ratio = C.Target("ratio", ratio, RATIO_TARGET)
    t_rss = C.Target("rss", syn.maxrss_mb, RSS_TARGET_MB, " MB")
    report = {
        "benchmark": "parse",
        "dump": str(dump),
        "lines": lines,
        "bytes": os.path.getsize(dump),
        "repeat": a.repeat,
        "sandbox": {"mode": sb.mode, "name": sb.name, "note": sb.note},
        "synack": {"cmd": cmd, "seconds": syn.seconds, "cpu_seconds": syn.cpu_seconds,
                   "runs": [r.seconds for r in syn_runs],
                   "cpu_runs": [r.cpu_seconds for r in syn_runs],
                   "peak_rss_mb": syn.maxrss_mb, "bytecode": bytecode},
        "iptables_restore": {
            be: {"cmd": r.cmd, "seconds": r.seconds, "cpu_seconds": r.cpu_seconds,
                 "runs": [x.seconds for x in ipt_runs[be]],
                 "cpu_runs": [x.cpu_seconds for x in ipt_runs[be]],
                 "version": C.iptables_version(be), "peak_rss_mb": r.maxrss_mb}
            for be, r in ipt.items()},
        "wall_ratio": wall_ratio,
        "load_average": os.getloadavg(),
        "reference_backend": ref_backend,
        "targets": {"ratio": t_ratio.as_dict(), "peak_rss_mb": t_rss.as_dict()},
        "pass": bool(t_ratio.ok and t_rss.ok),
    }

    rows = [("lines", f"{lines}", "", ""),
            (f"synack parse --quiet (bytecode {bytecode}): CPU / wall",
             f"{syn.cpu_seconds:.3f} s / {syn.seconds:.3f} s", "", "")]
    for be, r in ipt.items():
        rows.append((f"iptables-restore --test ({be}): CPU / wall",
                     f"{r.cpu_seconds:.3f} s / {r.seconds:.3f} s", "", ""))
    rows.append((f"ratio synack / iptables-restore ({ref_backend}), CPU",
                 "n/a" if ratio is None else f"{ratio:.2f}",
                 f"<= {RATIO_TARGET:g}", t_ratio.verdict))
    rows.append(("same, wall clock", "n/a" if wall_ratio is None else f"{wall_ratio:.2f}", "", ""))
    rows.append(("load average (1, 5, 15 min)", " ".join(f"{x:.1f}" for x in os.getloadavg()), "", ""))
    rows.append(("synack peak RSS", f"{syn.maxrss_mb:.1f} MB",
                 f"<= {RSS_TARGET_MB:g} MB", t_rss.verdict))
    text = (f"synack parse benchmark: {dump.name} (best of {a.repeat}, CPU and wall each; "
            f"sandbox: {sb.mode}{' ' + sb.name if sb.name else ''})\n"
            + C.render_table(rows))
    C.emit(report, text, a.json)
    if a.strict and not report["pass"]:
        return 2
    return 0


def _best(runs: list) -> "C.RunResult":
    """The run of least CPU time, with the least wall time of all runs and the peak RSS of all."""
    import dataclasses
    best = min(runs, key=lambda r: r.cpu_seconds)
    return dataclasses.replace(best, seconds=min(r.seconds for r in runs),
                               maxrss_kib=max(r.maxrss_kib for r in runs))


if __name__ == "__main__":
    sys.exit(main())
