"""Bad-input fuzz: random mutations of corpus dumps fed to ``synack parse`` / ``lint`` / ``explain``.

What it measures (issue 8, "a green result means the input was read and checked"):

* no Python traceback, whatever the input;
* every run exits 0, 1 or 2;
* no input that reads zero rules exits 0.

Mutations are byte- and line-level: flip or insert a byte (unusual whitespace, NUL, 0xff, a
quote, a backslash ...), delete / duplicate / swap / truncate lines, cut the file at a random
point, swap two words, splice in a word from another rule, replace a number. Each case runs the
CLI in-process (``analyzer.cli.main``) on a temporary file (lint 60%, parse 30%, explain of an
IPv4, IPv6 or open flow 5%, two files with or without --apply-in-order 5%); a failing case is written to
``--save DIR`` so it can be replayed with ``synack lint FILE``.

    python benchmarks/fuzz_inputs.py --cases 20000 --seed 1       # from the repository root
    python benchmarks/fuzz_inputs.py --cases 500 --json

With ``--env-share 0.1`` a tenth of the cases mutate ``samples/env/*.yaml`` instead (a number
where a list belongs, a string where a mapping belongs, a renamed key) and run ``lint --env``;
environment-file validation is parse/envfile.py's, so these cases are off by default and counted
apart (``env_tracebacks``) until it is hardened.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

def _corpus_root() -> Path:
    """``$SYNACK_CORPUS``, else ``../shared/corpus`` of the checkout (or of its worktree parent)."""
    if os.environ.get("SYNACK_CORPUS"):
        return Path(os.environ["SYNACK_CORPUS"])
    for base in (REPO_ROOT.parent, REPO_ROOT.parent.parent):
        if (base / "shared" / "corpus").is_dir():
            return base / "shared" / "corpus"
    return REPO_ROOT.parent / "shared" / "corpus"


CORPUS = _corpus_root() / "iptables"
ODD = ["\x0b", "\x0c", "\x85", "\u00a0", "\u2028", "\x00", "\xff", "\udcff", "\t", " ", '"', "\\",
       "!", "-", ":", "*", "#", "[", "]", "/", ",", "\r", "\n", "é", "\u200b"]
WORDS = ["-A", "-I", "-D", "-N", "-X", "-F", "-P", "-j", "-m", "-p", "-s", "-d", "!", "--dport",
         "--sport", "--to-destination", "COMMIT", "*nat", "*filter", ":FOO - [0:0]", "tcp", "udp",
         "ht\udcfftp", "http", "65536", "-1", "0x10", "10.0.0.1/33", "::1", "[0:0]", "--state",
         "-m set --match-set x src", "DNAT", "MASQUERADE", "ACCEPT", "KUBE-SVC-X", '"', "\\"]


def corpus_files(root: Path = CORPUS, max_bytes: int = 40000) -> list[Path]:
    """The corpus dumps small enough to mutate quickly (the large ones only make cases slow)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and 0 < p.stat().st_size <= max_bytes)


def mutate(text: str, rng: random.Random, others: list[str]) -> str:
    lines = text.split("\n")
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        op = rng.randrange(11)
        if not lines:
            lines = [""]
        i = rng.randrange(len(lines))
        line = lines[i]
        if op == 0 and line:  # replace a character
            k = rng.randrange(len(line))
            lines[i] = line[:k] + rng.choice(ODD) + line[k + 1:]
        elif op == 1:  # insert a character
            k = rng.randrange(len(line) + 1)
            lines[i] = line[:k] + rng.choice(ODD) + line[k:]
        elif op == 2:
            del lines[i]
        elif op == 3:
            lines.insert(i, line)
        elif op == 4:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 5:  # truncate the file (a dump cut by a pager or a full disk)
            cut = rng.randrange(len("\n".join(lines)) + 1)
            lines = "\n".join(lines)[:cut].split("\n")
        elif op == 6 and line:  # cut a line short
            lines[i] = line[:rng.randrange(len(line))]
        elif op == 7:  # swap two words of a line
            w = line.split(" ")
            if len(w) > 2:
                a, b = rng.randrange(len(w)), rng.randrange(len(w))
                w[a], w[b] = w[b], w[a]
                lines[i] = " ".join(w)
        elif op == 8:  # insert a word
            w = line.split(" ")
            w.insert(rng.randrange(len(w) + 1), rng.choice(WORDS))
            lines[i] = " ".join(w)
        elif op == 9 and others:  # splice a line of another dump
            other = rng.choice(others).split("\n")
            lines.insert(i, rng.choice(other))
        elif op == 10:  # change a number
            w = line.split(" ")
            nums = [k for k, x in enumerate(w) if any(c.isdigit() for c in x)]
            if nums:
                k = rng.choice(nums)
                w[k] = str(rng.choice((0, 1, 255, 256, 65535, 65536, 2**32, -1, 33, 129)))
                lines[i] = " ".join(w)
    return "\n".join(lines)


def mutate_env(text: str, rng: random.Random) -> str:
    """An environment file with a structural mistake people make: a number where a list belongs,
    a string where a mapping belongs, a renamed key; or one of the line-level mutations."""
    import re
    op = rng.randrange(4)
    if op == 0:
        spans = [m.span() for m in re.finditer(r"\[[^\[\]\n]*\]", text)]
        if spans:
            a, b = rng.choice(spans)
            return text[:a] + rng.choice(("80", "x", "{}", "null", "[[1]]")) + text[b:]
    if op == 1:
        spans = [m.span() for m in re.finditer(r"\{[^{}\n]*\}", text)]
        if spans:
            a, b = rng.choice(spans)
            return text[:a] + rng.choice(("somewhere", "1", "[]", "{x: 1}")) + text[b:]
    if op == 2:
        keys = [m.span(1) for m in re.finditer(r"(?m)^\s*-?\s*([a-z_.-]+):", text)]
        if keys:
            a, b = rng.choice(keys)
            k = text[a:b]
            i = rng.randrange(len(k))
            return text[:a] + k[:i] + k[i + 1:] + text[b:]
    return mutate(text, rng, [])


def rules_read(path: str) -> int:
    """How many rules the parser reads from the file (the zero-rule measure)."""
    from analyzer.parse import load_ruleset
    from analyzer.parse.kinds import identify
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        text = f.read()
    if identify(text).name.startswith("cilium"):  # read by the Cilium reader: its listings count
        from analyzer.parse.cilium import parse_cilium
        try:
            return len(parse_cilium(text, path).dump.listings)
        except Exception:
            return -1
    try:
        res = load_ruleset((text, path))
    except Exception:
        return -1
    return res.rule_count() if hasattr(res, "rule_count") \
        else sum(1 for _ in res.ruleset.rules())


def run_case(argv: list[str]) -> tuple[int | None, str | None]:
    """(exit code, traceback text or None) of one in-process CLI run."""
    from analyzer.cli import main
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 2), None
    except BaseException:  # noqa: BLE001 - a traceback is exactly what we count
        return None, traceback.format_exc()
    return rc, None


def fuzz(cases: int, seed: int, files: list[Path] | None = None, save: Path | None = None,
         progress: bool = False, env_share: float = 0.0) -> dict:
    """``env_share`` of the cases mutate the sample environment files (``lint --env``)."""
    import shutil
    rng = random.Random(seed)
    files = files if files is not None else corpus_files()
    if not files:
        return {"cases": 0, "skipped": "no corpus"}
    texts = [p.read_text(encoding="utf-8", errors="surrogateescape") for p in files]
    stats = {"cases": 0, "tracebacks": 0, "bad_exit": 0, "zero_rules_exit_0": 0, "exits": {},
             "causes": {}, "examples": [], "env_cases": 0, "env_tracebacks": 0}
    tmp = Path(tempfile.mkdtemp(prefix="synack-fuzz-"))
    path = tmp / "case.rules"
    envs = []
    if env_share:
        shutil.copytree(REPO_ROOT / "samples" / "env", tmp / "env")
        envs = [(p.name, p.read_text()) for p in sorted((tmp / "env").glob("*.yaml"))]
    t0 = time.time()
    try:
        for n in range(cases):
            if envs and rng.random() < env_share:
                name, src = rng.choice(envs)
                env_path = tmp / "env" / "case.yaml"
                env_path.write_bytes(mutate_env(src, rng).encode("utf-8", "surrogateescape"))
                argv = ["lint", "--env", str(env_path)]
                rc, tb = run_case(argv)
                stats["cases"] += 1
                stats["env_cases"] += 1
                stats["exits"][str(rc)] = stats["exits"].get(str(rc), 0) + 1
                if tb is not None or rc not in (0, 1, 2):
                    stats["env_tracebacks"] += tb is not None
                    stats["bad_exit"] += rc not in (0, 1, 2) and tb is None
                    cause = "env: " + (tb.strip().splitlines()[-1][:110] if tb else f"exit {rc}")
                    stats["causes"][cause] = stats["causes"].get(cause, 0) + 1
                    if save is not None:
                        save.mkdir(parents=True, exist_ok=True)
                        shutil.copy(env_path, save / f"env-{seed}-{n}-{name}")
                continue
            k = rng.randrange(len(texts))
            text = mutate(texts[k], rng, texts)
            path.write_bytes(text.encode("utf-8", "surrogateescape"))
            r = rng.random()
            if r < 0.6:
                argv = ["lint", str(path)]
            elif r < 0.9:
                argv = ["parse", str(path)]
            elif r < 0.95:
                argv = ["explain", str(path), "--flow", rng.choice((
                    "tcp 10.0.0.1:1234 -> 10.96.0.10:80", "udp 10.0.0.1:53 -> 10.96.0.10:53",
                    "tcp [fd00::1]:1234 -> [fd00::10]:443", "10.0.0.1 -> 10.96.0.10")),
                        "--from-iface", "eth0"]
            else:  # two files applied in order (kube-proxy's base dump, then a transaction)
                other = tmp / "other.rules"
                other.write_bytes(texts[rng.randrange(len(texts))].encode("utf-8", "surrogateescape"))
                argv = ["lint", str(other), str(path)] + (["--apply-in-order"] if rng.random() < 0.5 else [])
            rc, tb = run_case(argv)
            stats["cases"] += 1
            stats["exits"][str(rc)] = stats["exits"].get(str(rc), 0) + 1
            problem = None
            if tb is not None:
                stats["tracebacks"] += 1
                cause = tb.strip().splitlines()[-1][:120]
                stats["causes"][cause] = stats["causes"].get(cause, 0) + 1
                problem = "traceback"
            elif rc not in (0, 1, 2):
                stats["bad_exit"] += 1
                problem = f"exit {rc}"
            elif rc == 0 and argv[0] != "explain" and rules_read(str(path)) == 0 and "--apply-in-order" not in argv:
                stats["zero_rules_exit_0"] += 1
                problem = "zero rules, exit 0"
            if problem:
                if len(stats["examples"]) < 20:
                    stats["examples"].append({"source": str(files[k]), "argv": argv[0], "problem": problem,
                                              "detail": (tb or "").strip().splitlines()[-1:] })
                if save is not None:
                    save.mkdir(parents=True, exist_ok=True)
                    (save / f"case-{seed}-{n}.rules").write_bytes(path.read_bytes())
            if progress and n and n % 1000 == 0:
                print(f"  {n} cases, {stats['tracebacks']} tracebacks, {time.time() - t0:.0f} s",
                      file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats["seconds"] = round(time.time() - t0, 1)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--save", type=Path, help="write each failing case into this directory")
    ap.add_argument("--env-share", type=float, default=0.0,
                    help="share of the cases that mutate samples/env/*.yaml and run lint --env "
                         "(environment-file validation is parse/envfile.py's; off by default)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    os.chdir(REPO_ROOT)
    stats = fuzz(a.cases, a.seed, corpus_files(a.corpus), a.save, progress=not a.json,
                 env_share=a.env_share)
    if a.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"{stats['cases']} cases in {stats.get('seconds', 0)} s (seed {a.seed}): "
              f"{stats.get('tracebacks', 0)} tracebacks, {stats.get('bad_exit', 0)} exits not 0/1/2, "
              f"{stats.get('zero_rules_exit_0', 0)} zero-rule inputs that exit 0; exits {stats.get('exits')}"
              + (f"; environment files: {stats['env_cases']} cases, {stats['env_tracebacks']} tracebacks"
                 if stats.get("env_cases") else ""))
        for cause, k in sorted(stats.get("causes", {}).items(), key=lambda x: -x[1]):
            print(f"  {k:6d}  {cause}")
        for ex in stats.get("examples", []):
            print(f"  example: {ex}")
    bad = stats.get("tracebacks", 0) + stats.get("bad_exit", 0) + stats.get("zero_rules_exit_0", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
