"""Parse layer: iptables-save / iptables-restore / ``iptables -S`` text -> frozen Ruleset.

Pipeline: line lexer (classifies physical lines, groups runs of declarations and commands) ->
Lark LALR over grammar/iptables.lark (the structure: tables, sections, COMMIT, with recovery) ->
builder (applies declarations and commands in order, as iptables-restore would) ->
option decoder (analyzer/parse/options.py) for each rule line.
"""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from functools import lru_cache

from lark import Lark, Token
from lark.exceptions import UnexpectedInput
from lark.lexer import Lexer

from analyzer.diagnostics import Diagnostic, Severity
from analyzer.grammar_loader import grammar_text
from analyzer.model.rules import (
    BUILTIN_CHAINS, AddrMatch, AddrTypeMatch, Chain, FragmentMatch, IfaceMatch, OpaqueMatch,
    ProtoMatch, Rule, Ruleset, Table, freeze_mapping,
)
from analyzer.parse import options as O
from analyzer.source import SourceFile, Span

FORMATS = ("save", "S")

GENERIC = {
    "-s": "src", "--source": "src", "--src": "src",
    "-d": "dst", "--destination": "dst", "--dst": "dst",
    "-p": "proto", "--protocol": "proto",
    "-i": "in", "--in-interface": "in", "-o": "out", "--out-interface": "out",
    "-f": "frag", "--fragment": "frag",
    "-m": "match", "--match": "match", "-j": "jump", "--jump": "jump", "-g": "goto", "--goto": "goto",
    "-c": "counters", "--set-counters": "counters", "-4": "v4", "--ipv4": "v4", "-6": "v6", "--ipv6": "v6",
}
COMMANDS = {
    "-A": "append", "--append": "append", "-I": "insert", "--insert": "insert",
    "-D": "delete", "--delete": "delete", "-R": "replace", "--replace": "replace",
    "-N": "new", "--new-chain": "new", "-X": "delete-chain", "--delete-chain": "delete-chain",
    "-F": "flush", "--flush": "flush", "-P": "policy", "--policy": "policy",
    "-Z": "zero", "--zero": "zero", "-E": "rename", "--rename-chain": "rename",
}
NOT_IN_RESTORE = {"-L": "--list", "--list": "--list", "-S": "--list-rules", "--list-rules": "--list-rules",
                  "-C": "--check", "--check": "--check"}
POLICIES = ("ACCEPT", "DROP", "QUEUE", "RETURN")

# code -> (name, summary); docs/parse-errors.md explains each with an example
PARSE_CODES = {
    "PRS000": ("not-a-dump", "input is not iptables-save, iptables -S or an iptables command list"),
    "PRS001": ("unexpected-line", "a line iptables-restore does not accept"),
    "PRS002": ("unknown-option", "unknown option or command (with the closest known one)"),
    "PRS003": ("malformed-rule", "missing or stray argument, double negation"),
    "PRS004": ("invalid-value", "a port, protocol, flag, state, mark or type iptables would refuse"),
    "PRS005": ("invalid-address", "an address or prefix that does not parse, or of the other family"),
    "PRS006": ("invalid-nat-range", "a corrupted --to-destination / --to-source / --to-ports"),
    "PRS007": ("invalid-target", "a target missing its required option"),
    "PRS008": ("unknown-target-option", "an option the target does not take"),
    "PRS009": ("unknown-match-module", "a match module synack does not know: kept, results APPROXIMATE"),
    "PRS010": ("missing-commit", "a table not closed with COMMIT"),
    "PRS011": ("rule-outside-table", "a rule or chain before any '*table' line"),
    "PRS012": ("commit-without-table", "COMMIT with no open table"),
    "PRS013": ("unknown-table", "a table name the kernel does not have"),
    "PRS014": ("bad-chain-declaration", "a ':CHAIN POLICY [p:b]' line that is malformed"),
    "PRS015": ("invalid-policy", "a policy on a user chain, or not ACCEPT/DROP"),
    "PRS016": ("chain-exists", "creating a chain that exists, deleting a builtin one"),
    "PRS017": ("undefined-chain", "a command on a chain that is not declared"),
    "PRS018": ("bad-rule-position", "insert/replace/delete at a position the chain does not have"),
    "PRS101": ("host-name", "a host name where an address belongs: resolved on the source machine"),
}
_COUNTERS = re.compile(r"^\[(\d+):(\d+)\]\s*")


@dataclass(frozen=True, slots=True)
class ParseResult:
    ruleset: Ruleset
    diagnostics: tuple[Diagnostic, ...]
    files: tuple[SourceFile, ...] = ()
    format: str = "save"

    @property
    def errors(self) -> int:
        return sum(1 for d in self.diagnostics if d.severity == Severity.ERROR)


class StrictError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


# ---------------------------------------------------------------------------- line lexer
class _LineLexer(Lexer):
    """Feeds Lark one token per table header, per run of declarations, per run of commands."""

    def __init__(self, lexer_conf):
        pass

    def lex(self, data):
        # data is an iterator over the pre-classified tokens: when Lark resumes after an
        # error it calls lex() again, and must continue where it stopped
        return data


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_text("iptables.lark"), parser="lalr", lexer=_LineLexer, start="start")


_CMD = re.compile(r"^\s*(?:sudo\s+)?(ip6?tables(?:-nft|-legacy)?)(?:\s|$)")
_LISTING = re.compile(r"^Chain \S+ \((?:policy \w+|\d+ references)")


def detect_format(text: str) -> str:
    """``save`` (iptables-save / restore input), ``S`` (``iptables -S``), ``cmd`` (a list of
    ``iptables -t nat -A ...`` commands), ``L`` (``iptables -L`` listing) or ``unknown``."""
    seen = 0
    kinds = {"save": 0, "S": 0, "cmd": 0, "L": 0, "other": 0}
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        seen += 1
        if s.startswith("*"):
            return "save"
        if s[:2] in ("-P", "-N", "-A", "-I", "-X", "-F") or s.startswith("[") or s.startswith(":"):
            kinds["S"] += 1
        elif _CMD.match(s):
            kinds["cmd"] += 1
        elif _LISTING.match(s):
            kinds["L"] += 1
        else:
            kinds["other"] += 1
        if seen >= 200:
            break
    if not seen:
        return "save"
    best = max(kinds, key=kinds.get)
    if best == "S" and kinds["cmd"] == 0:
        return "S"
    if best == "cmd" or (kinds["cmd"] and kinds["cmd"] >= kinds["S"]):
        return "cmd"
    if best == "L" or kinds["L"]:
        return "L"
    return "S" if kinds["S"] else "unknown"


def infer_table(text: str) -> str:
    """The table of an ``iptables -S`` dump: from its builtin chains' ``-P`` lines, else its targets."""
    pol = set(re.findall(r"(?m)^\s*-P\s+(\S+)", text))
    for t in ("nat", "mangle", "raw", "filter"):
        if pol and pol == set(BUILTIN_CHAINS[t]):
            return t
    if re.search(r"-j\s+(DNAT|SNAT|MASQUERADE|REDIRECT|NETMAP)\b", text):
        return "nat"
    if re.search(r"-j\s+(TPROXY|MARK|CONNMARK|TOS|DSCP|TCPMSS)\b|-A\s+(PREROUTING|POSTROUTING)\b", text):
        return "mangle" if "PREROUTING" not in pol or "INPUT" in pol else "raw"
    return "filter"


_ADDR_ARG = re.compile(r"(?:^|\s)(?:-[sd]|--(?:source|destination|src|dst|to-destination|to-source))\s+!?\s*(\[?[0-9a-fA-F:.]+)")


def detect_family(text: str) -> int:
    """6 when the dump's addresses are mostly IPv6 (or ip6tables-save wrote it), else 4."""
    head = text[:400]
    if "# Generated by ip6tables-save" in head:
        return 6
    if "# Generated by iptables-save" in head:
        return 4
    v4 = v6 = 0
    for m in _ADDR_ARG.finditer(text[:400000]):
        if m.group(1).count(":") > 1 or m.group(1).startswith("["):
            v6 += 1
        else:
            v4 += 1
    if v6 > v4:
        return 6
    if v4 == 0 and re.search(r"--icmpv6-type|ipv6-icmp|icmp6", text[:400000]):
        return 6
    return 4


def getopt_lookup(table, opt: str):
    """getopt_long semantics: an unambiguous prefix of a long option names it (``--to-port``)."""
    v = table.get(opt)
    if v is not None or not opt.startswith("--") or len(opt) < 4:
        return opt, v
    cands = [k for k in table if k.startswith(opt)]
    if len(cands) == 1:
        return cands[0], table[cands[0]]
    return opt, None


# ---------------------------------------------------------------------------- builder
class _ChainB:
    __slots__ = ("name", "builtin", "policy", "span", "rules", "counters")

    def __init__(self, name, builtin, policy, span, counters=None):
        self.name, self.builtin, self.policy, self.span = name, builtin, policy, span
        self.rules: list = []
        self.counters = counters


class _TableB:
    __slots__ = ("name", "chains", "span")

    def __init__(self, name, span):
        self.name, self.span = name, span
        self.chains: dict[str, _ChainB] = {}
        for c in BUILTIN_CHAINS.get(name, ()):
            self.chains[c] = _ChainB(c, True, "ACCEPT", None)


class Builder:
    """Applies iptables-restore input in order; several files apply as successive transactions."""

    def __init__(self, family: int = 4, noflush: bool = False, strict: bool = False):
        self.family = family
        self.noflush = noflush
        self.strict = strict
        self.tables: dict[str, _TableB] = {}
        self.diags: list[Diagnostic] = []
        self.files: list[SourceFile] = []
        self.partial = False  # chains may exist on the machine from earlier transactions
        self._cmd_offset: dict[tuple[str, int], int] = {}

    # -- diagnostics
    def diag(self, sf: SourceFile, line: int, col: int, end: int, code: str, msg: str,
             hint: str | None = None, sev: Severity = Severity.ERROR):
        d = Diagnostic(code, sev, msg, Span(sf.path, line, col, end), hint, sf.line(line))
        self.diags.append(d)
        if self.strict and sev == Severity.ERROR:
            raise StrictError(d)

    # -- input
    def feed(self, text: str, path: str, fmt: str | None = None, table: str | None = None):
        sf = SourceFile.from_text(text, path)
        self.files.append(sf)
        fmt = fmt or detect_format(text)
        if fmt in ("S", "cmd"):
            self.partial = True
        toks = self._lex(sf, fmt, table)
        synthetic_open = [False]  # a table opened by error recovery needs no second diagnostic

        def on_error(e):
            ip = e.interactive_parser
            tok = e.token
            if tok.type in ("TABLE_HEADER", "END") and "COMMIT" in e.expected:
                at_end = tok.type == "END"
                line = len(sf.lines) if at_end else tok.line
                if synthetic_open[0]:
                    synthetic_open[0] = False
                    ip.feed_token(Token("COMMIT", "", line=line))
                    ip.feed_token(tok)
                    return True
                self.diag(sf, line, 1, len(sf.line(line)) + 1, "PRS010",
                          "table not closed with COMMIT before "
                          + ("end of input" if at_end else "the next table"),
                          "iptables-restore rejects a table without COMMIT; add 'COMMIT'")
                ip.feed_token(Token("COMMIT", "", line=line))
                ip.feed_token(tok)
                return True
            if tok.type in ("DECLS", "COMMANDS"):
                first = tok.value[0]
                self.diag(sf, first, 1, len(sf.line(first)) + 1, "PRS011",
                          "rule or chain outside a table",
                          "start the table with '*filter' (or '*nat', ...) and end it with 'COMMIT'")
                ip.feed_token(Token("TABLE_HEADER", ("filter", first, True), line=first))
                synthetic_open[0] = True
                ip.feed_token(tok)
                return True
            if tok.type == "COMMIT":
                self.diag(sf, tok.line, 1, 7, "PRS012", "COMMIT without a table", None)
                return True
            return False

        tree = _parser().parse(iter(toks), on_error=on_error)
        for tnode in tree.children[:-1]:
            header, *sections, commit = tnode.children
            self._open_table(sf, header)
            tb = self.tables[header.value[0]]
            for sec in sections:
                tok = sec.children[0]
                if sec.data == "decls":
                    for ln in tok.value:
                        self._decl(sf, tb, ln)
                else:
                    for ln in tok.value:
                        self._command(sf, tb, ln)

    def _lex(self, sf: SourceFile, fmt: str, table: str | None):
        out: list[Token] = []
        run_kind, run = None, None
        if fmt in ("L", "unknown"):
            n = next((k for k, l in enumerate(sf.lines, 1) if l.strip()), 1)
            self.diag(sf, n, 1, len(sf.line(n)) + 1, "PRS000",
                      "this looks like `iptables -L` output, which loses rule details" if fmt == "L"
                      else "not an iptables dump: no '*table', rule or iptables command lines",
                      "give synack `iptables-save` (or `iptables -S`) output")
            out.append(Token("END", "", line=n))
            return out
        if fmt == "cmd":
            return self._lex_commands(sf, out)
        if fmt == "S":
            out.append(Token("TABLE_HEADER", (table or infer_table("\n".join(sf.lines)), 1, True), line=1))
        for n, raw in enumerate(sf.lines, 1):
            s = raw.strip()
            if not s or s[0] == "#":
                continue
            c = s[0]
            if c == "-" or c == "[":
                kind = "COMMANDS"
            elif c == ":":
                kind = "DECLS"
            elif c == "*":
                name = s[1:].strip()
                if name not in BUILTIN_CHAINS:
                    self.diag(sf, n, 2, len(raw) + 1, "PRS013", f"unknown table '{name}'",
                              O._suggest(name, BUILTIN_CHAINS, "table"))
                out.append(Token("TABLE_HEADER", (name, n, False), line=n))
                run_kind = None
                continue
            elif s == "COMMIT":
                out.append(Token("COMMIT", "COMMIT", line=n))
                run_kind = None
                continue
            else:
                col = len(raw) - len(raw.lstrip()) + 1
                word = s.split()[0]
                self.diag(sf, n, col, col + len(word), "PRS001", f"unexpected line starting with '{word}'",
                          "iptables-restore accepts '*table', ':CHAIN POLICY', rules ('-A ...'), "
                          "'COMMIT' and '#' comments")
                continue
            if kind == run_kind:
                run.append(n)
            else:
                run = [n]
                run_kind = kind
                out.append(Token(kind, run, line=n))
        if fmt == "S":
            out.append(Token("COMMIT", "COMMIT", line=len(sf.lines)))
        out.append(Token("END", "", line=len(sf.lines)))
        return out

    def _lex_commands(self, sf: SourceFile, out: list):
        """A list of shell commands (``iptables -t nat -A ...``): each line names its table."""
        current = None
        run = None
        for n, raw in enumerate(sf.lines, 1):
            s = raw.strip()
            if not s or s[0] == "#":
                continue
            m = _CMD.match(raw)
            if not m:
                col = len(raw) - len(raw.lstrip()) + 1
                self.diag(sf, n, col, col + len(s.split()[0]), "PRS001",
                          f"unexpected line in a command list: '{s.split()[0]}'",
                          "each line should be an iptables command such as 'iptables -t nat -A ...'")
                continue
            prog = m.group(1)
            if (prog.startswith("ip6")) != (self.family == 6):
                continue  # the other family's commands: analysed with --family
            if s.endswith("\\"):
                self.diag(sf, n, len(raw.rstrip()), len(raw.rstrip()) + 1, "PRS001",
                          "line continuation '\\' is not supported", "join the command onto one line")
                continue
            toks = O.tokenize(raw)
            k = 1
            while toks and toks[0][0] == "sudo":
                toks = toks[1:]
            tname = "filter"
            while k < len(toks) and toks[k][0] in ("-t", "--table", "-w", "--wait", "-W", "-v", "-n"):
                if toks[k][0] in ("-t", "--table") and k + 1 < len(toks):
                    tname = toks[k + 1][0]
                    k += 2
                elif toks[k][0] in ("-w", "--wait", "-W") and k + 1 < len(toks) and toks[k + 1][0].isdigit():
                    k += 2
                else:
                    k += 1
            if k >= len(toks):
                continue  # e.g. 'iptables-save' in a list of commands: reads, changes nothing
            self._cmd_offset[(sf.path, n)] = toks[k][1] - 1
            if tname != current:
                if current is not None:
                    out.append(Token("COMMIT", "COMMIT", line=n))
                out.append(Token("TABLE_HEADER", (tname, n, True), line=n))
                current = tname
                run = None
            if run is None:
                run = [n]
                out.append(Token("COMMANDS", run, line=n))
            else:
                run.append(n)
        if current is not None:
            out.append(Token("COMMIT", "COMMIT", line=len(sf.lines)))
        out.append(Token("END", "", line=len(sf.lines)))
        return out

    def _open_table(self, sf, header):
        name, line, synthetic = header.value
        if name not in BUILTIN_CHAINS:
            name = header.value[0]
        tb = self.tables.get(name)
        if tb is None or not (self.noflush or self.partial or synthetic and tb):
            # without --noflush, iptables-restore flushes the table and deletes its user chains
            tb = _TableB(name, Span(sf.path, line, 1, len(sf.line(line)) + 1) if line else None)
            self.tables[name] = tb

    def _decl(self, sf, tb: _TableB, n: int):
        raw = sf.line(n)
        indent = len(raw) - len(raw.lstrip())
        parts = raw.split()
        name = parts[0][1:]
        col = indent + 1
        span = Span(sf.path, n, col, len(raw.rstrip()) + 1)
        if not name or len(name) > 28:
            self.diag(sf, n, col, col + len(parts[0]), "PRS014",
                      "chain name missing" if not name else f"chain name '{name}' longer than 28 characters")
            return
        policy = parts[1] if len(parts) > 1 else None
        counters = None
        if len(parts) > 2:
            m = _COUNTERS.match(parts[2])
            if m:
                counters = (int(m.group(1)), int(m.group(2)))
        builtin = name in BUILTIN_CHAINS.get(tb.name, ())
        if policy is None:
            self.diag(sf, n, col, span.end_col, "PRS014", f"chain '{name}' declared without a policy",
                      "write ':NAME - [0:0]' for a user chain or ':INPUT ACCEPT [0:0]' for a builtin one")
            policy = "-"
        if builtin:
            if policy not in POLICIES[:2] and policy != "-":  # '-' keeps the current policy
                pc = raw.find(policy) + 1
                self.diag(sf, n, pc, pc + len(policy), "PRS015",
                          f"invalid policy '{policy}' for builtin chain {name}", "policies are ACCEPT or DROP")
            c = tb.chains[name]
            c.policy, c.span, c.counters = (policy if policy in POLICIES else "ACCEPT"), span, counters
            return
        if policy != "-":
            pc = raw.find(policy, len(parts[0])) + 1
            self.diag(sf, n, pc, pc + len(policy), "PRS015",
                      f"user chain '{name}' cannot have policy '{policy}'", "use '-' for user chains")
        c = tb.chains.get(name)
        if c is None:
            tb.chains[name] = _ChainB(name, False, None, span, counters)
        else:  # restore --noflush: declaring an existing chain flushes it (kube-proxy relies on this)
            c.rules.clear()
            c.span = span

    # -- commands
    def _command(self, sf, tb: _TableB, n: int):
        raw = sf.line(n)
        line = raw.rstrip()
        counters = None
        off = self._cmd_offset.get((sf.path, n))
        if off is None:
            off = len(line) - len(line.lstrip())
        body = line[off:]
        if body.startswith("["):
            m = _COUNTERS.match(body)
            if not m:
                self.diag(sf, n, off + 1, off + 2, "PRS003", "malformed counters '[packets:bytes]'")
                return
            counters = (int(m.group(1)), int(m.group(2)))
            off += m.end()
            body = line[off:]
        toks = O.tokenize(body)
        if off:
            toks = [(t, c + off, e + off) for t, c, e in toks]
        if not toks:
            return
        cmd = COMMANDS.get(toks[0][0])
        if cmd is None:
            t, c, e = toks[0]
            if t in NOT_IN_RESTORE:
                self.diag(sf, n, c, e, "PRS002", f"'{t}' is not allowed in iptables-restore input",
                          "remove the line: restore input only changes rules")
            else:
                self.diag(sf, n, c, e, "PRS002", f"unknown command '{t}'",
                          O._suggest(t, COMMANDS, "command") or "rules start with '-A CHAIN'")
            return
        chain_name = toks[1][0] if len(toks) > 1 else None
        if cmd in ("flush", "zero", "delete-chain") and chain_name is None:
            if cmd == "flush":
                for c in tb.chains.values():
                    c.rules.clear()
            elif cmd == "delete-chain":
                for k in [k for k, c in tb.chains.items() if not c.builtin]:
                    del tb.chains[k]
            return
        if chain_name is None:
            t, c, e = toks[0]
            self.diag(sf, n, c, e, "PRS003", f"'{t}' needs a chain name")
            return
        _, cc, ce = toks[1]
        chain = tb.chains.get(chain_name)
        if cmd == "new":
            if chain is not None:
                self.diag(sf, n, cc, ce, "PRS016", f"chain '{chain_name}' already exists", None,
                          Severity.WARNING if self.partial else Severity.ERROR)
            else:
                tb.chains[chain_name] = _ChainB(chain_name, False, None, Span(sf.path, n, cc, ce))
            return
        if chain is None:
            if self.partial or self.noflush:
                # may exist on the machine from an earlier transaction: analyse what we have
                self.diag(sf, n, cc, ce, "PRS017",
                          f"chain '{chain_name}' is not declared here (created by an earlier transaction?)",
                          f"declare it with ':{chain_name} - [0:0]' or pass the earlier dump first",
                          Severity.WARNING)
                chain = tb.chains[chain_name] = _ChainB(chain_name, False, None, Span(sf.path, n, cc, ce))
            else:
                self.diag(sf, n, cc, ce, "PRS017", f"chain '{chain_name}' does not exist in table '{tb.name}'",
                          O._suggest(chain_name, tb.chains, "chain") or
                          f"declare it with ':{chain_name} - [0:0]' before its rules")
                if cmd not in ("append", "insert"):
                    return
                chain = tb.chains[chain_name] = _ChainB(chain_name, False, None, Span(sf.path, n, cc, ce))
        if cmd == "delete-chain":
            if chain.builtin:
                self.diag(sf, n, cc, ce, "PRS016", f"cannot delete builtin chain {chain_name}")
            else:
                del tb.chains[chain_name]
            return
        if cmd == "flush":
            chain.rules.clear()
            return
        if cmd == "zero":
            return
        if cmd == "policy":
            pol = toks[2][0] if len(toks) > 2 else None
            if not chain.builtin or pol not in POLICIES[:2]:
                where = toks[2] if len(toks) > 2 else toks[1]
                self.diag(sf, n, where[1], where[2], "PRS015",
                          f"cannot set policy '{pol}' on chain {chain_name}",
                          "policies apply to builtin chains and are ACCEPT or DROP")
                return
            chain.policy = pol
            return
        if cmd == "rename":
            if len(toks) < 3:
                self.diag(sf, n, cc, ce, "PRS003", "-E needs OLD and NEW chain names")
                return
            tb.chains[toks[2][0]] = chain
            del tb.chains[chain_name]
            chain.name = toks[2][0]
            return
        start, pos = 2, None
        if cmd in ("insert", "replace", "delete") and len(toks) > 2 and toks[2][0].isdigit():
            pos = int(toks[2][0])
            start = 3
        if cmd == "delete" and pos is not None:
            if 1 <= pos <= len(chain.rules):
                del chain.rules[pos - 1]
            else:
                self.diag(sf, n, toks[2][1], toks[2][2], "PRS018", f"no rule {pos} in chain {chain_name}")
            return
        decoded = self._decode(sf, n, toks, start, counters, line.strip())
        if decoded is None:
            return
        if cmd == "append":
            chain.rules.append(decoded)
        elif cmd == "insert":
            p = (pos or 1) - 1
            if p > len(chain.rules):
                self.diag(sf, n, toks[2][1], toks[2][2], "PRS018", f"index {pos} past the end of {chain_name}")
                p = len(chain.rules)
            chain.rules.insert(p, decoded)
        elif cmd == "replace":
            if pos is None or not 1 <= pos <= len(chain.rules):
                self.diag(sf, n, cc, ce, "PRS018", f"-R needs an existing rule number in {chain_name}")
                return
            chain.rules[pos - 1] = decoded
        elif cmd == "delete":
            key = _rule_key(decoded)
            for i, r in enumerate(chain.rules):
                if _rule_key(r) == key:
                    del chain.rules[i]
                    break
            else:
                self.diag(sf, n, cc, ce, "PRS018", f"-D: no such rule in {chain_name}",
                          None, Severity.WARNING if self.partial else Severity.ERROR)

    def _decode(self, sf, n, toks, start, counters, text):
        """Decode a rule's options; returns (matches, target, span, text, counters) or None."""
        ctx = O.Ctx(self.family)
        matches: list = []
        target = None
        tgt_name = tgt_col = None
        tgt_opts: list = []
        goto = False
        mod = None
        proto_mod = None
        stat: list = []
        addrtype: list = []
        neg = False
        neg_col = 0
        i, ntok = start, len(toks)
        ok = True

        def err(code, msg, idx, hint=None, end_idx=None, warning=False):
            nonlocal ok
            a = toks[min(idx, ntok - 1)]
            b = toks[min(end_idx if end_idx is not None else idx, ntok - 1)]
            self.diag(sf, n, a[1], b[2], code, msg, hint, Severity.WARNING if warning else Severity.ERROR)
            if not warning:
                ok = False

        def take(idx, nargs):
            """Arguments of the option at idx (old-style '--opt ! value' negation allowed)."""
            nonlocal neg, neg_col
            args = []
            j = idx + 1
            while len(args) < nargs:
                if j >= ntok:
                    return None, j
                t = toks[j][0]
                if t == "!" and not args:
                    neg = True
                    j += 1
                    continue
                args.append(t)
                j += 1
            return args, j

        while i < ntok:
            t, c, e = toks[i]
            if t == "!":
                if neg:
                    err("PRS003", "double negation '! !'", i)
                neg, neg_col = True, c
                i += 1
                continue
            ctx.index = i
            g = GENERIC.get(t)
            if g is None and tgt_name is None and t.startswith("--") and t not in GENERIC:
                full, g = getopt_lookup(GENERIC, t)
                if g is not None and mod is not None and any(
                        k.startswith(t) for k in O.MATCH_MODULES.get(mod, ())):
                    g = None  # ambiguous with the module's own options: the module wins
            if tgt_name is not None and g is None:
                spec = O.TARGETS.get(tgt_name, ({},))[0]
                t, nargs = getopt_lookup(spec, t)
                if nargs is None and (tgt_name in O.TARGETS or not t.startswith("-")):
                    if t.startswith("-"):
                        err("PRS008", f"unknown option '{t}' for target {tgt_name}", i,
                            O.suggest_target_option(tgt_name, t))
                    else:
                        err("PRS003", f"unexpected argument '{t}'", i)
                    i += 1
                    continue
                if nargs is None:  # unknown target: keep its options verbatim
                    nargs = 0
                    while i + 1 + nargs < ntok and not toks[i + 1 + nargs][0].startswith("-"):
                        nargs += 1
                args, j = take(i, nargs)
                if args is None:
                    err("PRS003", f"option '{t}' of {tgt_name} needs {nargs} argument(s)", i)
                    break
                tgt_opts.append((t, args, i))
                i = j
                continue
            if g is not None:
                if g == "jump" or g == "goto":
                    if tgt_name is not None:
                        err("PRS003", "more than one target (-j/-g) in a rule", i)
                    if i + 1 >= ntok:
                        err("PRS003", f"'{t}' needs a target name", i)
                        break
                    tgt_name, tgt_col = toks[i + 1][0], c
                    goto = g == "goto"
                    i += 2
                    continue
                if g == "match":
                    if i + 1 >= ntok:
                        err("PRS003", "'-m' needs a module name", i)
                        break
                    if stat:
                        matches.append(self._merge_stat(stat, ctx, err))
                        stat = []
                    mod = toks[i + 1][0]
                    mod = O.MODULE_ALIASES.get(mod, mod)
                    if mod not in O.MATCH_MODULES:
                        err("PRS009", f"unknown match module '{mod}': kept, results depending on it are APPROXIMATE",
                            i + 1, O.suggest_module(mod), warning=True)
                    if mod == "addrtype":
                        addrtype.append(len(matches))
                    i += 2
                    continue
                if g in ("v4", "v6"):
                    if (g == "v4") != (self.family == 4):
                        return None  # rule for the other family: iptables-restore skips it too
                    i += 1
                    continue
                if g == "frag":
                    matches.append(FragmentMatch(neg_col if neg else c, e, neg))
                    neg = False
                    i += 1
                    continue
                nargs = 2 if g == "counters" else 1
                args, j = take(i, nargs)
                if args is None:
                    err("PRS003", f"option '{t}' needs an argument", i)
                    break
                col0 = neg_col if neg else c
                end = toks[j - 1][2]
                if g == "counters":
                    counters = (int(args[0]), int(args[1])) if all(a.isdigit() for a in args) else counters
                elif g in ("src", "dst"):
                    nets = []
                    for a in args[0].split(","):
                        ctx.index = j - 1
                        try:
                            net = O.network(a, ctx)
                        except O.DecodeError as ex:
                            err(ex.code, ex.message, j - 1, ex.hint)
                            net = None
                        if net is not None:
                            nets.append(net)
                    if ctx.host_names:
                        for idx, name in ctx.host_names:
                            err("PRS101", f"host name '{name}' instead of an address: resolved on the "
                                "machine at load time, unknown here", idx,
                                "use the address; synack treats this match as unknown (APPROXIMATE)",
                                warning=True)
                        ctx.host_names.clear()
                        matches.append(OpaqueMatch(col0, end, neg, "", t, tuple(args)))
                    elif nets:
                        matches.append(AddrMatch(col0, end, neg, g, tuple(nets)))
                elif g == "proto":
                    p = args[0].lower()
                    num = O.PROTOCOLS.get(p)
                    if num is None:
                        if p.isdigit() and int(p) < 256:
                            num = int(p)
                        else:
                            err("PRS004", f"unknown protocol '{args[0]}'", j - 1,
                                O._suggest(p, O.PROTOCOLS, "protocol"))
                            i = j
                            neg = False
                            continue
                    matches.append(ProtoMatch(col0, end, neg, num, O.PROTO_NAMES.get(num, p)))
                    proto_mod = O.IMPLICIT_MODULES.get(num) if not neg else None
                else:  # in/out interface
                    name = args[0]
                    if len(name) > 15:
                        err("PRS004", f"interface name '{name}' longer than 15 characters", j - 1)
                    matches.append(IfaceMatch(col0, end, neg, g, name))
                neg = False
                i = j
                continue
            # a module option: the current -m module, else the protocol's implicit module
            spec = None
            use_mod = mod
            if mod is not None:
                spec = O.MATCH_MODULES.get(mod)
                if spec is not None and t not in spec:
                    if proto_mod and t in O.MATCH_MODULES[proto_mod]:
                        use_mod, spec = proto_mod, O.MATCH_MODULES[proto_mod]
                    else:
                        spec = spec  # fall through to error below
            elif proto_mod is not None:
                use_mod, spec = proto_mod, O.MATCH_MODULES[proto_mod]
            if mod is not None and use_mod == mod and mod not in O.MATCH_MODULES:
                nargs = 0  # unknown module: options run until the next option
                while i + 1 + nargs < ntok and not toks[i + 1 + nargs][0].startswith("-") \
                        and toks[i + 1 + nargs][0] != "!":
                    nargs += 1
                args, j = take(i, nargs)
                matches.append(O.unknown_module_match(mod, t, args, neg, neg_col if neg else c, toks[j - 1][2]))
                neg = False
                i = j
                continue
            entry = None
            if spec is not None:
                t, entry = getopt_lookup(spec, t)
            if entry is None:
                if not t.startswith("-"):
                    err("PRS003", f"unexpected argument '{t}'", i,
                        "an option ('--name') was expected here" if not t.isdigit() or i != start else
                        "rule numbers are not allowed with -A; use '-I CHAIN N' to insert at a position")
                else:
                    err("PRS002", f"unknown option '{t}'" + (f" for '-m {mod}'" if mod else ""), i,
                        O.suggest_option(t, use_mod, GENERIC))
                    # skip its probable arguments so the rest of the rule is still checked
                    while i + 1 < ntok and not toks[i + 1][0].startswith("-") and toks[i + 1][0] != "!":
                        i += 1
                neg = False
                i += 1
                continue
            nargs, handler = entry
            args, j = take(i, nargs)
            if args is None:
                err("PRS003", f"option '{t}' needs {nargs} argument(s)", i)
                break
            col0 = neg_col if neg else c
            end = toks[j - 1][2]
            try:
                m = handler(use_mod, t, args, neg, col0, end, ctx)
            except O.DecodeError as ex:
                err(ex.code, ex.message, ex.index if ex.index > i else j - 1, ex.hint, warning=ex.warning)
                m = OpaqueMatch(col0, end, neg, use_mod, t, tuple(args)) if ex.warning else None
            if m is not None:
                if use_mod == "statistic":
                    stat.append(m)
                elif use_mod == "addrtype" and t.startswith("--limit-iface"):
                    addrtype.append(("limit", t[-3:].strip("-")))
                else:
                    matches.append(m)
            neg = False
            i = j
        if stat:
            matches.append(self._merge_stat(stat, ctx, err))
        if addrtype and any(isinstance(a, tuple) for a in addrtype):
            lim = next(a[1] for a in addrtype if isinstance(a, tuple))
            matches = [AddrTypeMatch(m.col, m.end_col, m.negated, m.direction, m.types, lim)
                       if isinstance(m, AddrTypeMatch) else m for m in matches]
        if neg:
            err("PRS003", "'!' at the end of the rule negates nothing", ntok - 1)
        if tgt_name is not None:
            try:
                target = O.make_target(tgt_name, tgt_opts, ctx, tgt_col, toks[-1][2] if tgt_opts else
                                       toks[min(ntok - 1, _index_of(toks, tgt_col) + 1)][2], goto)
            except O.DecodeError as ex:
                err(ex.code, ex.message, min(ex.index, ntok - 1), ex.hint)
                target = None
        if not ok and target is None and not matches:
            return None
        span = Span(sf.path, n, toks[0][1], toks[-1][2])
        return (tuple(matches), target, span, text, counters)

    @staticmethod
    def _merge_stat(parts, ctx, err):
        try:
            return O.merge_statistic(parts, ctx)
        except O.DecodeError as ex:
            err(ex.code, ex.message, ctx.index, ex.hint)
            return OpaqueMatch(parts[0].col, parts[-1].end_col, parts[0].negated, "statistic",
                               " ".join(p.option for p in parts), tuple(a for p in parts for a in p.args))

    # -- result
    def result(self, fmt: str = "save") -> ParseResult:
        tables = {}
        for tname, tb in self.tables.items():
            chains = {}
            for cname, cb in tb.chains.items():
                rules = tuple(Rule(tname, cname, k, m, t, sp, tx, ct)
                              for k, (m, t, sp, tx, ct) in enumerate(cb.rules, 1))
                chains[cname] = Chain(tname, cname, cb.builtin, cb.policy if cb.builtin else None,
                                      rules, cb.span, cb.counters)
            tables[tname] = Table(tname, freeze_mapping(chains), tb.span)
        rs = Ruleset(self.family, freeze_mapping(tables), tuple(f.path for f in self.files))
        diags = tuple(sorted(self.diags, key=Diagnostic.sort_key))
        return ParseResult(rs, diags, tuple(self.files), fmt)


def _index_of(toks, col):
    for k, (_, c, _) in enumerate(toks):
        if c == col:
            return k
    return len(toks) - 1


def _rule_key(r):
    m, t, _, _, _ = r
    strip = lambda o: (type(o).__name__,) + tuple(
        getattr(o, f) for f in o.__slots__ if f not in ("col", "end_col")) if o is not None else None
    return (tuple(strip(x) for x in m), strip(t))


def load_ruleset(inputs, fmt: str | None = None, family: int | None = None, noflush: bool = False,
                 strict: bool = False, table: str | None = None) -> ParseResult:
    """Parse one or several dumps (``[(text, path), ...]`` or a single ``(text, path)``); several
    inputs apply in order as successive iptables-restore transactions."""
    if isinstance(inputs, tuple):
        inputs = [inputs]
    fam = family or detect_family(inputs[0][0] if inputs else "")
    b = Builder(fam, noflush=noflush or len(inputs) > 1, strict=strict)
    enabled = gc.isenabled()
    gc.disable()  # the parse allocates ~1M small objects and frees none: the GC only costs time
    try:
        f = None
        for text, path in inputs:
            f = fmt or detect_format(text)
            b.feed(text, path, f, table)
    finally:
        if enabled:
            gc.enable()
    return b.result(f or "save")
