#!/usr/bin/env python3
"""Turn fffuu's printed output (its service matrices and spoofing certification) into the
compact reference JSON that tests/test_matrix_fffuu.py compares `synack matrix` with.

fffuu prints each matrix as ``a |-> {lo .. hi} u addr u ...`` lines and ``(a,b)`` edges, and
the spoofing check as ``("iface","True (certified)")`` lines. The JSON keeps, per port, each
class as inclusive integer ranges and the edges by class name, plus which interfaces fffuu
certified, and the provenance given on the command line.

    python tools/fffuu_reference.py FFFUU_OUTPUT --source 'diekmann/Iptables_Semantics@COMMIT:PATH' \\
        --command 'fffuu --ipassmt ... DUMP' --dump CORPUS_DUMP_NAME --chain FORWARD > ref.json
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys


def parse_ranges(text: str) -> list[list[int]]:
    out = []
    for part in text.split(" u "):
        part = part.strip()
        lo, hi = part[1:-1].split(" .. ") if part.startswith("{") else (part, part)
        out.append([int(ipaddress.ip_address(lo)), int(ipaddress.ip_address(hi))])
    return out


def parse(text: str) -> dict:
    matrices, spoof, cur = {}, {}, None
    in_spoof = False
    for line in text.splitlines():
        m = re.match(r"=========== TCP port (\d+)->(\d+) =========", line)
        if m:
            in_spoof = False
            cur = matrices[m.group(2)] = {"sport": int(m.group(1)), "classes": {}, "edges": []}
            continue
        if line.startswith("Spoofing certification results:"):
            in_spoof = True
            continue
        if line.startswith("=="):
            in_spoof = False
        m = re.match(r'^\("([^"]+)","(True \(certified\)|Probably not \(False\))"\)$', line)
        if in_spoof and m:
            spoof[m.group(1)] = m.group(2).startswith("True")
            continue
        if cur is None:
            continue
        m = re.match(r"^(\w+) \|-> (.*)$", line)
        if m:
            cur["classes"][m.group(1)] = parse_ranges(m.group(2))
            continue
        m = re.match(r"^\((\w+),(\w+)\)$", line)
        if m:
            cur["edges"].append([m.group(1), m.group(2)])
    return {"matrices": matrices, "spoofing_certified": spoof}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="fffuu's stdout (e.g. a golden file of its test suite)")
    ap.add_argument("--source", required=True, help="where that output comes from (repo@commit:path)")
    ap.add_argument("--command", required=True, help="the fffuu command line that printed it")
    ap.add_argument("--dump", required=True, help="the corpus dump (iptables/iptables-semantics/NAME)")
    ap.add_argument("--chain", default="FORWARD")
    ap.add_argument("--table", default="filter")
    ap.add_argument("--ipassmt", help="the assignment file under tests/data/fffuu/, if fffuu was given one")
    args = ap.parse_args(argv)
    with open(args.output, encoding="utf-8") as f:
        ref = parse(f.read())
    doc = {"provenance": {"source": args.source, "command": args.command,
                          "note": "derived by tools/fffuu_reference.py from fffuu's printed output"},
           "dump": args.dump, "table": args.table, "chain": args.chain, "ipassmt": args.ipassmt, **ref}
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
