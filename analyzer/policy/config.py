"""Policy layer: project configuration and suppressions.

Configuration: ``[tool.synack]`` in ``pyproject.toml`` or a ``synack.toml``, found by walking up
from the first input like ruff does (``synack.toml`` wins over ``pyproject.toml`` in the same
directory; a ``pyproject.toml`` without ``[tool.synack]`` is skipped).

Suppressions, next to what they silence: ``-m comment --comment "synack: ignore CHN005"`` on a
rule, and ``# synack: ignore[NAT001]`` lines in environment files. A suppression that silences
nothing is reported (POL002), so stale ones do not pile up.
"""
from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from dataclasses import dataclass, field

from analyzer.diagnostics import Diagnostic, Severity
from analyzer.source import Span

CONFIG_KEYS = {"select", "ignore", "fail-on", "fail-on-incomplete", "per-file-ignores", "env", "extend-select",
               "extend-ignore"}
UNUSED = ("POL002", "unused-suppression")
POL_CODES = {
    "POL001": ("invalid-policy", "error", "The policy file is not valid YAML or does not follow the policy schema."),
    "POL002": ("unused-suppression", "warning", "A suppression comment silences no finding (remove it)."),
}


class ConfigError(ValueError):
    pass


@dataclass
class Config:
    path: str | None = None
    select: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    fail_on: str | None = None
    per_file_ignores: dict = field(default_factory=dict)  # glob -> [codes]
    env: str | None = None
    fail_on_incomplete: bool = False  # lint: exit 1 when something in scope was not read or followed

    def ignored_for(self, path: str | None) -> list:
        """Codes ignored for diagnostics in ``path`` (globs relative to the config's directory).

        >>> Config("/p/synack.toml", per_file_ignores={"legacy/*.rules": ["CHN005"]}).ignored_for("/p/legacy/a.rules")
        ['CHN005']
        """
        if not path or not self.per_file_ignores:
            return []
        base = os.path.dirname(os.path.abspath(self.path)) if self.path else os.getcwd()
        rel = os.path.relpath(os.path.abspath(path), base)
        out = []
        for glob, codes in self.per_file_ignores.items():
            if fnmatch.fnmatch(rel, glob) or fnmatch.fnmatch(os.path.basename(path), glob):
                out.extend(codes)
        return out


def _candidates(directory: str):
    d = os.path.abspath(directory)
    while True:
        yield d
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent


def find_config(start: str | None) -> Config | None:
    """The nearest configuration above ``start`` (a file or directory; default the cwd)."""
    start = start or os.getcwd()
    if os.path.isfile(start) or not os.path.isdir(start):
        start = os.path.dirname(os.path.abspath(start)) or os.getcwd()
    for d in _candidates(start):
        for name in ("synack.toml", ".synack.toml", "pyproject.toml"):
            p = os.path.join(d, name)
            if not os.path.isfile(p):
                continue
            cfg = load_config(p)
            if cfg is not None:
                return cfg
    return None


def load_config(path: str) -> Config | None:
    """A configuration file; None for a pyproject.toml without ``[tool.synack]``."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if os.path.basename(path) == "pyproject.toml":
        doc = doc.get("tool", {}).get("synack")
        if doc is None:
            return None
    unknown = set(doc) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(CONFIG_KEYS))})")

    def codes(key):
        v = doc.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{path}: '{key}' must be a list of codes")
        return v
    fail_on = doc.get("fail-on")
    if fail_on is not None and fail_on not in ("error", "warning", "info"):
        raise ConfigError(f"{path}: 'fail-on' must be error, warning or info")
    pfi = doc.get("per-file-ignores", {})
    if not isinstance(pfi, dict):
        raise ConfigError(f"{path}: 'per-file-ignores' must be a table of glob = [codes]")
    incomplete = doc.get("fail-on-incomplete", False)
    if not isinstance(incomplete, bool):
        raise ConfigError(f"{path}: 'fail-on-incomplete' must be true or false")
    env = doc.get("env")
    if env is not None:
        env = env if os.path.isabs(env) else os.path.normpath(os.path.join(os.path.dirname(path), env))
    return Config(path, codes("select") + codes("extend-select"), codes("ignore") + codes("extend-ignore"),
                  fail_on, {k: ([v] if isinstance(v, str) else list(v)) for k, v in pfi.items()}, env,
                  incomplete)


# ------------------------------------------------------------------ suppressions
_RULE_SUPPRESS = re.compile(r'--comment\s+(?:"([^"]*)"|(\S+))')
_MARK = re.compile(r"synack:\s*ignore\s*(?:\[([^\]]*)\]|([A-Za-z0-9_,\- ]+))")
_ENV_SUPPRESS = re.compile(r"#\s*synack:\s*ignore\s*\[([^\]]*)\]")


@dataclass
class Suppression:
    span: Span
    codes: tuple[str, ...]
    scope: str                  # "rule" (one dump line) | "env" (whole environment) | "namespace:NAME"
    used: set = field(default_factory=set)

    def covers(self, d: Diagnostic) -> str | None:
        for c in self.codes:
            if d.code.startswith(c) or c == d.name:
                return c
        return None


def _codes(text: str) -> tuple[str, ...]:
    return tuple(c for c in re.split(r"[\s,]+", text.strip()) if c)


def rule_suppressions(path: str, lines) -> list[Suppression]:
    """``-m comment --comment "synack: ignore CHN005"`` on a rule line of a dump.

    >>> [s.codes for s in rule_suppressions("r", ['-A X -m comment --comment "synack: ignore CHN005,NAT001" -j DROP'])]
    [('CHN005', 'NAT001')]
    """
    out = []
    for n, line in enumerate(lines, 1):
        if "synack" not in line:
            continue
        for m in _RULE_SUPPRESS.finditer(line):
            text = m.group(1) if m.group(1) is not None else m.group(2)
            mk = _MARK.search(text)
            if mk:
                codes = _codes(mk.group(1) if mk.group(1) is not None else mk.group(2))
                if codes:
                    col = m.start() + 1
                    out.append(Suppression(Span(path, n, col, m.end() + 1), codes, "rule"))
    return out


def env_suppressions(path: str, text: str) -> list[Suppression]:
    """``# synack: ignore[NAT001]`` lines of an environment file: at the top level they cover the
    whole environment; inside a namespace's block, what concerns that namespace (its rules, or a
    finding about a connection from or through it)."""
    import yaml

    if not _ENV_SUPPRESS.search(text):
        return []  # (most files: no need to compose the YAML for the namespaces' blocks)
    blocks = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if isinstance(root, yaml.MappingNode):
            for k, v in root.value:
                if getattr(k, "value", None) == "namespaces" and isinstance(v, yaml.MappingNode):
                    for nk, nv in v.value:
                        blocks.append((nk.start_mark.line + 1, nv.end_mark.line + 1, str(nk.value)))
    except yaml.YAMLError:
        pass
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        m = _ENV_SUPPRESS.search(line)
        if not m:
            continue
        codes = _codes(m.group(1))
        if not codes:
            continue
        scope = "env"
        if line[:1].isspace():
            for lo, hi, name in blocks:
                if lo <= n <= hi:
                    scope = f"namespace:{name}"
        out.append(Suppression(Span(path, n, m.start() + 1, m.end() + 1), codes, scope))
    return out


def _namespaces_of(d: Diagnostic, env) -> set:
    names = set()
    if env is None:
        return names
    for name, spec in env.namespaces.items():
        if d.span is not None and d.span.path in spec.dumps:
            names.add(name)
    m = re.match(r"\[([^\]]+)\]", d.message)
    if m:
        names.update(x.strip() for x in m.group(1).split("->"))
    return names


class Suppressor:
    """Collects the suppressions of the inputs, filters diagnostics, reports the unused ones."""

    def __init__(self, config: Config | None = None):
        self.config = config
        self.items: list[Suppression] = []
        self._files: set = set()
        self.env = None

    def add_dump(self, path: str, lines=None) -> None:
        if path in self._files or path.startswith("<"):
            return
        self._files.add(path)
        if lines is None:
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
            except OSError:
                return
            if "synack" not in text:
                return  # no suppression comment (a 10,000-service dump: 189,000 lines not split)
            lines = text.splitlines()
        self.items += rule_suppressions(path, lines)

    def add_env(self, env) -> None:
        self.env = env
        try:
            with open(env.path, encoding="utf-8") as f:
                self.items += env_suppressions(env.path, f.read())
        except OSError:
            pass
        for spec in env.namespaces.values():
            for p in spec.dumps:
                self.add_dump(p)

    def filter(self, diags) -> list[Diagnostic]:
        kept = []
        for d in diags:
            if self.config is not None and d.span is not None:
                ign = self.config.ignored_for(d.span.path)
                if any(d.code.startswith(c) or c == d.name for c in ign):
                    continue
            hit = None
            for s in self.items:
                if s.scope == "rule":
                    if d.span is None or d.span.path != s.span.path or d.span.line != s.span.line:
                        continue
                elif s.scope.startswith("namespace:"):
                    if s.scope.split(":", 1)[1] not in _namespaces_of(d, self.env):
                        continue
                c = s.covers(d)
                if c is not None:
                    s.used.add(c)
                    hit = s
            if hit is None:
                kept.append(d)
        return kept

    def unused(self, ran) -> list[Diagnostic]:
        """POL002 for each code of a suppression that silenced nothing, among the codes ``ran``
        (a predicate: a suppression of a check that did not run is not stale)."""
        out = []
        for s in self.items:
            for c in s.codes:
                if c in s.used or not ran(c):
                    continue
                where = "this rule" if s.scope == "rule" else (
                    f"namespace '{s.scope.split(':', 1)[1]}'" if s.scope != "env" else "this environment")
                line = None
                try:
                    with open(s.span.path, encoding="utf-8", errors="replace") as f:
                        for i, text in enumerate(f, 1):
                            if i == s.span.line:
                                line = text.rstrip("\n")
                                break
                except OSError:
                    pass
                out.append(Diagnostic(UNUSED[0], Severity.WARNING,
                                      f"unused suppression: no {c} finding on {where}", s.span,
                                      f"remove '{c}' from the suppression", line, name=UNUSED[1]))
        return out
