"""Environment-file fuzz: random mutations of samples/env/*.yaml fed to `synack lint --env` and
`synack explain --env`; every run must end with exit 0, 1 or 2 and no Python traceback.

Mutations (one to three per case): a number, a string, a list, a mapping or null where something
else belongs, a key renamed with a typo, a key dropped, a list item duplicated, a value moved under
another key. The dumps the samples name are reachable through symlinks next to the mutated file.

    python benchmarks/fuzz_env.py                 # 5,000 cases, seed 0
    python benchmarks/fuzz_env.py --cases 20000 --seed 7 --show 5

tests/test_envfile.py runs a seeded few hundred of the same cases.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "env"

WEIRD = [0, 7, -1, 65536, 3.5, True, None, "", "x", "somewhere", "10.0.0.1/24@eth0", "eth0",
         "10.0.0.300", "tcp 1.2.3.4:1 -> 5.6.7.8:2", [], [1, 2], ["a:b"], {}, {"port": "x"},
         {"a": {"b": 1}}, "net.ipv4.ip_foward", "original", "::1", "a:eth0"]


def _paths(doc, path=()):
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, path + (i,))


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _typo(word: str, rng: random.Random) -> str:
    w = list(str(word)) or ["x"]
    i = rng.randrange(len(w))
    op = rng.choice("drsi")
    if op == "d" and len(w) > 1:
        del w[i]
    elif op == "r":
        w[i] = rng.choice("abcdefghijklmnopqrstuvwxyz._-")
    elif op == "s" and i + 1 < len(w):
        w[i], w[i + 1] = w[i + 1], w[i]
    else:
        w.insert(i, rng.choice("abcdefghijklmnopqrstuvwxyz"))
    return "".join(w)


def mutate(doc, rng: random.Random):
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent, last = _get(doc, path[:-1]), path[-1]
        op = rng.random()
        if op < 0.45:
            parent[last] = copy.deepcopy(rng.choice(WEIRD))
        elif op < 0.65 and isinstance(parent, dict):
            parent[_typo(last, rng)] = parent.pop(last)
        elif op < 0.75:
            del parent[last]
        elif op < 0.85 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif op < 0.92:
            parent[last] = str(parent[last])
        else:
            parent[last] = [parent[last]] if rng.random() < 0.5 else {"k": parent[last]}
    return doc


def samples():
    import yaml
    return [(p, yaml.safe_load(p.read_text())) for p in sorted(SAMPLES.glob("*.yaml"))]


def workdir() -> str:
    """A directory with the samples' dumps linked in, where mutated files are written."""
    d = tempfile.mkdtemp(prefix="synack-envfuzz-")
    for f in SAMPLES.iterdir():
        if f.suffix != ".yaml":
            os.symlink(f, os.path.join(d, f.name))
    return d


def run_case(text: str, doc, where: str) -> tuple[list[int], str | None]:
    """Exit codes of lint --env and explain --env on one mutated file, or the traceback."""
    from analyzer.cli import main

    path = os.path.join(where, "env.yaml")
    with open(path, "w") as f:
        f.write(text)
    argvs = [["lint", "--env", path]]
    ex = (doc.get("examples") or [None])[0] if isinstance(doc, dict) and isinstance(doc.get("examples"), list) else None
    if isinstance(ex, dict):
        argvs.append(["explain", "--env", path, "--from", str(ex.get("from")), "--flow", str(ex.get("flow"))])
    codes = []
    for argv in argvs:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:  # noqa: BLE001 - a traceback is what this fuzz looks for
            return codes, traceback.format_exc()
        if rc not in (0, 1, 2):
            return codes, f"exit code {rc!r}"
        codes.append(rc)
    return codes, None


def cases(n: int, seed: int):
    import yaml
    rng = random.Random(seed)
    base = samples()
    for i in range(n):
        name, doc = rng.choice(base)
        m = mutate(doc, rng)
        yield i, name.name, m, yaml.safe_dump(m, sort_keys=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=3, help="print this many failing cases in full")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    where = workdir()
    t0 = time.perf_counter()
    fails, exits = [], {0: 0, 1: 0, 2: 0}
    for i, name, doc, text in cases(args.cases, args.seed):
        codes, tb = run_case(text, doc, where)
        for c in codes:
            exits[c] += 1
        if tb:
            fails.append((i, name, text, tb))
    dt = time.perf_counter() - t0
    print(f"{args.cases} cases (seed {args.seed}) in {dt:.0f} s: {len(fails)} traceback(s); "
          f"exit codes {exits}")
    for i, name, text, tb in fails[:args.show]:
        print(f"--- case {i} (from {name})\n{text}\n{tb}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
