"""Parse layer: Cilium load-balancer dumps -> :mod:`analyzer.model.services`.

Pipeline (as for iptables): line lexer (``_classify``: one token per header, row, continuation,
map entry or status line; prompts, ``[...]`` elisions and kubectl noise dropped) -> Lark LALR over
grammar/cilium.lark (which line may follow which) -> builder (decodes each layout's cells).
JSON (``service list -o json``, ``service get -o json``) is read with :mod:`json`; a txtar archive
(Cilium's own LB tests) is split into its sections and each ``.table``/``.expected`` section parsed
as its own listing.

Layouts and the Cilium versions that print them (upstream cilium/cilium, cilium-dbg/cmd):

- service list: ``ID Frontend Service Type Backend``; ``/TCP`` suffixes and ``(active)`` states
  since 1.15 / 1.12 (older lists print neither); ``/i`` marks the internal-scope frontend of a
  service with two traffic-policy scopes (1.11+); an empty Backend cell is a frontend without
  backends; CI logs prefix every line with a TAB and a space.
- service get before 1.14: ``FRONTEND =>`` then ``N => BACKEND (ID)`` lines.
- bpf lb list: ``SERVICE ADDRESS  BACKEND ADDRESS`` (2018-2020: ``BACKEND (REVNAT)``, the master
  entry ``0.0.0.0:0`` carries the flags from 1.7), ``BACKEND ADDRESS (REVNAT_ID) (SLOT)`` (1.15),
  and since 1.16 one row per map entry with the slot after the service address.
- statedb tables (1.17+ ``db/show``) and lbmaps dumps (``BE:``/``REV:``/``SVC:``/``SRCRANGE:``).
"""
from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass, replace
from functools import lru_cache

from lark import Lark, Token
from lark.lexer import Lexer

from analyzer.diagnostics import Diagnostic, Severity
from analyzer.grammar_loader import grammar_text
from analyzer.model.services import (
    SERVICE_TYPES, Backend, CiliumDump, CiliumStatus, Endpoint, Listing, NodeAddress, RevNat, Service,
    TableBackend,
)
from analyzer.source import SourceFile, Span

PARSE_CODES = {
    "PRS200": ("not-a-cilium-dump", "input is none of the Cilium dumps synack reads"),
    "PRS201": ("cilium-unexpected-line", "a line that is not part of the Cilium table it stands in"),
    "PRS202": ("cilium-invalid-address", "an address, port or protocol that does not parse"),
    "PRS203": ("cilium-anonymised-address", "an address replaced by a placeholder (10.x.x.31): its row is skipped"),
    "PRS204": ("cilium-invalid-json", "JSON that does not parse, or not the service model's shape"),
    "PRS205": ("cilium-cell-misaligned", "a statedb table cell that crosses its column boundary"),
}
PARSE_SEVERITIES = {"PRS203": "warning"}

# ------------------------------------------------------------------------------ addresses
_EP = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>\d{1,3}(?:\.\d{1,3}){3}))"
    r":(?P<port>\d{1,5})(?:[/:](?P<proto>(?!i$)[A-Za-z]+))?(?P<int>/i)?$")
_ADDR_CACHE: dict = {}


class _EndpointCache(dict):
    """text -> (Endpoint, scope) for the addresses that parse (a frozen Endpoint is shared)."""

    def __missing__(self, text):
        try:
            v = parse_endpoint(text)
        except AddrError:
            return None
        self[text] = v
        return v

    get = dict.__getitem__


_EP_CACHE = _EndpointCache()
_STATES = "active|terminating|quarantined|maintenance"
_FAST_ROW = re.compile(r"\s*(\d+)\s+(\S+)\s+([A-Za-z][\w-]*)(?:\s+(\d+) => (\S+)(?: \((" + _STATES
                       + r")\))?)?\s*$")
_FAST_CONT = re.compile(r"\s*(\d+) => (\S+)(?: \((" + _STATES + r")\))?\s*$")


class AddrError(ValueError):
    def __init__(self, msg: str, code: str = "PRS202"):
        super().__init__(msg)
        self.code = code


def _ip(text: str):
    a = _ADDR_CACHE.get(text)
    if a is None:
        # inet_pton validates in C and the packed form builds the address without re-parsing
        # (5x ipaddress.ip_address on 30k distinct backend addresses)
        try:
            if ":" in text:
                a = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
            else:
                a = ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
        except OSError:
            raise ValueError(f"not an IP address '{text}'") from None
        _ADDR_CACHE[text] = a
    return a


def parse_endpoint(text: str) -> tuple[Endpoint, str]:
    """``ADDR:PORT[/PROTO][/i]`` as Cilium prints it -> (Endpoint, scope).

    >>> parse_endpoint("10.0.2.15:32528/i")
    (Endpoint(address=IPv4Address('10.0.2.15'), port=32528, protocol=None), 'internal')
    >>> str(parse_endpoint("[fd00::b050]:69/UDP")[0])
    '[fd00::b050]:69/UDP'
    """
    m = _EP.match(text)
    if m is None:
        if re.search(r"(^|[.:\[])[xX*]+([.:\]]|$)", text):
            raise AddrError(f"anonymised address '{text}'", "PRS203")
        raise AddrError(f"not an address:port '{text}'")
    try:
        addr = _ip(m.group("v6") or m.group("v4"))
    except ValueError:
        raise AddrError(f"not an IP address '{m.group('v6') or m.group('v4')}'") from None
    port = int(m.group("port"))
    if port > 65535:
        raise AddrError(f"port {port} out of range")
    proto = m.group("proto")
    if proto is not None:
        proto = proto.upper()
        if proto not in ("TCP", "UDP", "SCTP", "ANY", "NONE"):
            raise AddrError(f"unknown protocol '{proto}' in '{text}'")
        if proto == "NONE":
            proto = None
    return Endpoint(addr, port, proto), ("internal" if m.group("int") else "external")


# ------------------------------------------------------------------------------ line lexer
class _LineLexer(Lexer):
    def __init__(self, lexer_conf):
        pass

    def lex(self, data):
        return data  # the pre-classified tokens; Lark calls again after an error: continue


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_text("cilium.lark"), parser="lalr", lexer=_LineLexer, start="start")


_NOISE = re.compile(
    r"^(?:\$ |# |[\w.-]+@[\w.-]+:?\S*[#$] |Defaulted container |\[\.\.\.?\]$|\.\.\.$|:$|…$"
    r"|(?:cmd|Exitcode|Stdout|Stderr|err):"
    r"|(?:Creating new service|Added service|Updated service|Updating backend states|Updating existing service"
    r"|Deleting service|Service \S+ deleted)\b)")
_SVC_HEADER = re.compile(r"^(ID\s+)?Frontend\s+(Service Type\s+)?Backend(\s+Source Ranges)?\s*$")
_LB_HEADER = re.compile(r"^SERVICE ADDRESS\s+BACKEND ADDRESS")
_REVNAT_HEADER = re.compile(r"^ID\s+(?:BACKEND|FRONTEND|SERVICE) ADDRESS")
_DB_COLUMNS = frozenset({
    "Address", "Type", "ServiceName", "PortName", "Status", "Backends", "Name", "Source", "PortNames",
    "TrafficPolicy", "Flags", "Instances", "NodeName", "Service", "NodePort", "Primary", "DeviceName",
    "Shadows", "RedirectTo", "Since", "Error", "State", "ProxyRedirect", "HealthCheckNodePort",
})
_MAP_ENTRY = re.compile(r"^[A-Z][A-Z-]*: [A-Z]+=")
_STATUS_KEY = re.compile(r"^[A-Za-z][\w ./()-]*:(?:\s|$)")
_GET_FRONTEND = re.compile(r"^(\S+) =>$")
_BACKEND_CELL = re.compile(r"^(\d+) => (\S+)(?: \((\w+)\))?")
_CIDR = re.compile(r"^[0-9A-Fa-f.:]+/\d{1,3}$")


@dataclass
class _Line:
    n: int              # 1-based line number
    raw: str
    text: str           # without the indentation (and without a CI-log TAB prefix)
    col: int            # 1-based column where text starts in raw


def _is_addr(tok: str) -> bool:
    return bool(_EP.match(tok)) or ("." in tok and ":" in tok and not tok.startswith("("))


class _Builder:
    """Classifies lines into tokens, runs the grammar, and decodes each listing's cells."""

    def __init__(self, sf: SourceFile, diags: list, section: str | None = None, line_offset: int = 0):
        self.sf = sf
        self.diags = diags
        self.section = section
        self.off = line_offset   # a txtar section's first line in the file
        self.lines: dict[int, _Line] = {}

    # -------------------------------------------------------------------- diagnostics
    def diag(self, ln: _Line | int, col: int, end: int, code: str, msg: str, hint: str | None = None,
             severity: Severity | None = None):
        n = ln.n if isinstance(ln, _Line) else ln
        line = self.sf.line(n)
        sev = severity if severity is not None else (
            Severity.WARNING if PARSE_SEVERITIES.get(code) == "warning" else Severity.ERROR)
        self.diags.append(Diagnostic(code, sev, msg, Span(self.sf.path, n, col, max(end, col + 1)), hint,
                                     line, name=PARSE_CODES[code][0]))

    def _tok_span(self, ln: _Line, tok: str) -> tuple[int, int]:
        i = ln.raw.find(tok)
        col = (i + 1) if i >= 0 else ln.col
        return col, col + len(tok)

    def addr_error(self, ln: _Line, tok: str, e: AddrError):
        col, end = self._tok_span(ln, tok)
        hint = ("its service is skipped: give the dump with its real addresses" if e.code == "PRS203"
                else "Cilium prints ADDR:PORT[/PROTO], IPv6 in brackets: [f00d::1]:80/TCP")
        self.diag(ln, col, end, e.code, str(e), hint)

    def span(self, ln: _Line, tok: str | None = None) -> Span:
        if tok is None:
            return Span(self.sf.path, ln.n, ln.col, len(ln.raw) + 1)
        col, end = self._tok_span(ln, tok)
        return Span(self.sf.path, ln.n, col, end)

    # -------------------------------------------------------------------- lexing
    def classify(self, first: int, last: int) -> list[Token]:
        toks: list[Token] = []
        ctx = None             # kind of the listing the next rows belong to
        layout = None          # (has_id, has_type, has_ranges) of a service list
        db_cols = None
        continued_prompt = False
        lines = self.sf.lines
        run = None             # the SVC_ROWS/LB_ROWS token the next row or continuation extends

        def rows(kind: str, n: int, is_row: bool, extra=None):
            # one token per run of rows and their continuation lines (a 10k-service list is one
            # token); a continuation with no row before it is a token of its own, which the
            # grammar refuses
            nonlocal run
            if run is not None and run.type == kind + "_ROWS":
                run.value[1].append((n, is_row))
            elif is_row:
                run = Token(kind + "_ROWS", (extra, [(n, True)]), line=n)
                toks.append(run)
            else:
                toks.append(Token(kind + "_CONT", n, line=n))

        for n in range(first, last + 1):
            raw = lines[n - 1]
            text = raw.strip()
            if not text:
                if ctx in ("db", "status"):
                    ctx = None
                continued_prompt = False
                continue
            col = len(raw) - len(raw.lstrip()) + 1
            ln = _Line(n, raw, text, col)
            self.lines[n] = ln
            if ctx == "svc" and text[0].isdigit():  # the common case, first
                words = text.split()
                kind = self._svc_kind(words, layout)
                if kind:
                    rows("SVC", n, kind == "SVC_ROW", layout)
                    continue
            if len(toks) and toks[-1] is not run:
                run = None
            if continued_prompt or _NOISE.match(text):
                run = None
                # a shell prompt (with its '\' continuation lines), an elision or a CLI message:
                # a new command begins, so rows after it need their own header
                continued_prompt = text.endswith("\\")
                if not text.startswith(("[", ".", ":", "…")):
                    ctx = None
                continue
            m = _SVC_HEADER.match(text)
            if m:
                ctx, layout = "svc", (bool(m.group(1)), bool(m.group(2)), bool(m.group(3)))
                toks.append(Token("SVC_HEADER", (n, layout), line=n))
                continue
            if _LB_HEADER.match(text):
                ctx = "lb"
                toks.append(Token("LB_HEADER", n, line=n))
                continue
            if _REVNAT_HEADER.match(text):
                ctx = "revnat"
                toks.append(Token("REVNAT_HEADER", n, line=n))
                continue
            words = text.split()
            if len(words) >= 2 and words[0] in ("Address", "Name", "Service") and all(
                    w in _DB_COLUMNS for w in words):
                ctx = "db"
                db_cols = self._columns(raw, words)
                toks.append(Token("DB_HEADER", (n, db_cols), line=n))
                continue
            if ctx == "db":
                toks.append(Token("DB_ROW", (n, db_cols), line=n))
                continue
            if _MAP_ENTRY.match(text):
                ctx = "map"
                toks.append(Token("MAP_ENTRY", n, line=n))
                continue
            gm = _GET_FRONTEND.match(text)
            if gm and _is_addr(gm.group(1)):
                ctx = "get"
                toks.append(Token("GET_FRONTEND", n, line=n))
                continue
            if ctx == "get" and _BACKEND_CELL.match(text):
                toks.append(Token("GET_BACKEND", n, line=n))
                continue
            if ctx == "revnat" and len(words) == 2 and words[0].isdigit():
                toks.append(Token("REVNAT_ROW", n, line=n))
                continue
            if ctx == "lb" or (ctx is None and _is_addr(words[0]) and len(words) >= 2
                               and (words[1].startswith("(") or _is_addr(words[1]))
                               and "=>" not in words):
                kind = self._lb_kind(words)
                if kind:
                    ctx = "lb"
                    rows("LB", n, kind == "LB_ROW")
                    continue
            if ctx in (None, "svc"):
                kind = self._svc_kind(words, layout if ctx == "svc" else None)
                if kind:
                    if ctx is None:  # a header-less fragment (CI logs cut the table)
                        ctx, layout = "svc", None
                    rows("SVC", n, kind == "SVC_ROW", layout)
                    continue
            if ctx == "status" or _STATUS_KEY.match(text):
                # a status report runs to the next blank line; only the lines parse_status knows
                # are read (the health tree, controller and map tables are not modelled)
                ctx = "status"
                toks.append(Token("STATUS_LINE", n, line=n))
                continue
            self.diag(ln, ln.col, len(raw) + 1, "PRS201", self._unexpected(ctx, text),
                      "synack reads service list, bpf lb list, statedb tables, lbmaps dumps and status")
        toks.append(Token("END", last, line=last))
        return toks

    @staticmethod
    def _unexpected(ctx, text) -> str:
        where = {"svc": "in a service list", "lb": "in a bpf lb list", "revnat": "in a revnat list",
                 "get": "in a service get", "map": "in a map dump", "status": "in a status report"}
        return f"unexpected line {where.get(ctx, 'outside any Cilium table')}: '{text[:60]}'"

    @staticmethod
    def _columns(raw: str, words: list[str]) -> tuple:
        cols, pos = [], 0
        for w in words:
            i = raw.index(w, pos)
            cols.append((w, i))
            pos = i + len(w)
        return tuple(cols)

    @staticmethod
    def _svc_kind(words: list[str], layout) -> str | None:
        if len(words) >= 2 and words[1] == "=>" and words[0].isdigit():
            return "SVC_CONT"
        if layout is not None and layout[2] and len(words) == 1 and _CIDR.match(words[0]):
            return "SVC_CONT"   # a source-range cell alone (prototype layout of cilium#13303)
        has_id = layout[0] if layout else words[0].isdigit()
        i = 1 if has_id else 0
        if has_id and not words[0].isdigit():
            return None
        if len(words) > i and (_is_addr(words[i]) or re.match(r"^\S+:\d+", words[i])):
            return "SVC_ROW"
        return None

    @staticmethod
    def _lb_kind(words: list[str]) -> str | None:
        addrs = 0
        for w in words:
            if w.startswith("["):
                break
            if _is_addr(w) or re.match(r"^\S+:\d+(/\w+)*$", w):
                addrs += 1
        if addrs >= 2:
            return "LB_ROW"
        if addrs == 1:
            return "LB_CONT"
        return None

    # -------------------------------------------------------------------- building
    def build(self, first: int, last: int) -> list[Listing]:
        toks = self.classify(first, last)

        def on_error(e):
            tok = e.token
            if tok.type == "END":
                return False
            n = tok.value[1][0][0] if tok.type.endswith("_ROWS") else (
                tok.value[0] if isinstance(tok.value, tuple) else tok.value)
            ln = self.lines[n]
            what = {"SVC_CONT": "a backend line with no service row above it",
                    "LB_CONT": "a backend entry with no service address above it",
                    "GET_BACKEND": "a backend line with no frontend above it",
                    "DB_ROW": "a table row with no header", "REVNAT_ROW": "a revnat row with no header"}
            self.diag(ln, ln.col, len(ln.raw) + 1, "PRS201",
                      what.get(tok.type, f"unexpected {tok.type.lower()}") + " (the dump is cut here?)",
                      "give the table from its header line")
            return True

        tree = _parser().parse(iter(toks), on_error=on_error)
        out = []
        for node in tree.children:
            if not hasattr(node, "data"):
                continue
            lst = getattr(self, "_" + node.data)(node)
            if lst is not None:
                out.append(replace(lst, section=self.section) if self.section else lst)
        return out

    # service list ---------------------------------------------------------------
    @staticmethod
    def _entries(run) -> list[list[int]]:
        """A run's lines grouped per row: [[row, continuation, ...], ...]."""
        out: list[list[int]] = []
        for n, is_row in run.value[1]:
            if is_row:
                out.append([n])
            else:
                out[-1].append(n)
        return out

    def _service_list(self, node):
        header = node.children[0]
        n, layout = header.value
        entries = self._entries(node.children[1]) if len(node.children) > 1 else []
        services = [s for e in entries if (s := self._svc_entry(e, layout)) is not None]
        return Listing("service-list", tuple(services), span=self.span(self.lines[n]))

    def _service_fragment(self, node):
        entries = self._entries(node.children[0])
        services = [s for e in entries if (s := self._svc_entry(e, None)) is not None]
        return Listing("service-list", tuple(services), span=self.span(self.lines[entries[0][0]]))

    def _svc_entry(self, entry, layout) -> Service | None:
        if layout is None or layout == (True, True, False):
            s = self._svc_entry_fast(entry)
            if s is not None:
                return s
        row, *conts = entry
        ln = self.lines[row]
        words = ln.text.split()
        has_id, has_type, has_ranges = layout if layout else (words[0].isdigit(), True, False)
        i = 0
        sid = None
        if has_id:
            sid = int(words[0])
            i = 1
        fe_text = words[i]
        i += 1
        try:
            fe, scope = parse_endpoint(fe_text)
        except AddrError as e:
            self.addr_error(ln, fe_text, e)
            return None
        stype = None
        if has_type and i < len(words) and not words[i].isdigit():
            stype = words[i]
            i += 1
        backends: list[Backend] = []
        ranges: list = []
        ok = self._svc_cells(ln, words[i:], backends, ranges, has_ranges)
        for c in conts:
            cl = self.lines[c]
            ok &= self._svc_cells(cl, cl.text.split(), backends, ranges, has_ranges)
        if not ok:
            return None  # a cell that does not parse (reported): half a backend set would mislead lint
        return Service(fe, stype, tuple(backends), id=sid, scope=scope,
                       source_ranges=tuple(ranges) if has_ranges else None, span=self.span(ln, fe_text))

    def _svc_entry_fast(self, entry) -> Service | None:
        """The layout of every release since 1.10 (ID, frontend, type, backends) with one regex
        match per line; anything else (None) takes the general path, which reports errors."""
        row, *conts = entry
        ln = self.lines[row]
        m = _FAST_ROW.match(ln.raw)
        if m is None:
            return None
        fe = _EP_CACHE.get(m.group(2))
        if fe is None:
            return None
        path, n = self.sf.path, ln.n
        backends = []
        if m.group(4) is not None:
            be = _EP_CACHE.get(m.group(5))
            if be is None:
                return None
            backends.append(Backend(be[0], m.group(6), None, None, None, int(m.group(4)), None,
                                    Span(path, n, m.start(5) + 1, m.end(5) + 1)))
        elif conts:
            return None
        for c in conts:
            cl = self.lines[c]
            mc = _FAST_CONT.match(cl.raw)
            if mc is None:
                return None
            be = _EP_CACHE.get(mc.group(2))
            if be is None:
                return None
            backends.append(Backend(be[0], mc.group(3), None, None, None, int(mc.group(1)), None,
                                    Span(path, c, mc.start(2) + 1, mc.end(2) + 1)))
        return Service(fe[0], m.group(3), tuple(backends), int(m.group(1)), fe[1],
                       span=Span(path, n, m.start(2) + 1, m.end(2) + 1))

    def _svc_cells(self, ln: _Line, words: list[str], backends: list, ranges: list, has_ranges: bool) -> bool:
        i = 0
        if len(words) >= 3 and words[1] == "=>" and words[0].isdigit():
            b = self._backend(ln, int(words[0]), words[2], words[3] if len(words) > 3 else None)
            i = 3
            if len(words) > 3 and words[3].startswith("("):
                i = 4
            if b is None:
                return False
            backends.append(b)
        elif words and words[0].isdigit() and len(words) >= 2 and words[1] == "=>":
            self.diag(ln, ln.col, len(ln.raw) + 1, "PRS201", "a backend cell without its address",
                      "the line is cut: give the whole table")
            return False
        rest = words[i:]
        for w in rest:
            if has_ranges and _CIDR.match(w):
                try:
                    ranges.append(ipaddress.ip_network(w, strict=False))
                    continue
                except ValueError:
                    pass
            col, end = self._tok_span(ln, w)
            self.diag(ln, col, end, "PRS201", f"unexpected cell '{w}' in a service list row",
                      "a row is: ID FRONTEND TYPE [N => BACKEND (STATE)]")
            return False
        return True

    def _backend(self, ln: _Line, index: int, addr: str, paren: str | None) -> Backend | None:
        try:
            ep, _ = parse_endpoint(addr)
        except AddrError as e:
            self.addr_error(ln, addr, e)
            return None
        state = None
        if paren and paren.startswith("(") and paren.endswith(")"):
            inner = paren[1:-1]
            if inner.isdigit():
                pass  # service get before 1.14: the service ID, not a state
            elif inner.lower() in ("active", "terminating", "quarantined", "maintenance"):
                state = inner.lower()
            else:
                col, end = self._tok_span(ln, paren)
                self.diag(ln, col, end, "PRS201", f"unknown backend state {paren}",
                          "Cilium's states: active, terminating, quarantined, maintenance")
        return Backend(ep, state=state, index=index, span=self.span(ln, addr))

    # service get (before 1.14) -----------------------------------------------------
    def _service_get(self, node):
        head, *rows = node.children
        ln = self.lines[head.value]
        fe_text = ln.text.split()[0]
        try:
            fe, scope = parse_endpoint(fe_text)
        except AddrError as e:
            self.addr_error(ln, fe_text, e)
            return None
        backends, sid = [], None
        for r in rows:
            rl = self.lines[r.value]
            m = _BACKEND_CELL.match(rl.text)
            b = self._backend(rl, int(m.group(1)), m.group(2), f"({m.group(3)})" if m.group(3) else None)
            if m.group(3) and m.group(3).isdigit():
                sid = int(m.group(3))
            if b is not None:
                backends.append(b)
        svc = Service(fe, None, tuple(backends), id=sid, scope=scope, span=self.span(ln, fe_text))
        return Listing("service-get", (svc,), span=self.span(ln))

    # bpf lb list -------------------------------------------------------------------
    _FLAGS = re.compile(r"\[([^\]]*)\]")
    _L7 = re.compile(r"\(L7LB Proxy Port: (\d+)\)")

    def _lb_list(self, node):
        n = node.children[0].value
        entries = self._entries(node.children[1]) if len(node.children) > 1 else []
        return self._lb_entries(entries, self.span(self.lines[n]))

    def _lb_fragment(self, node):
        entries = self._entries(node.children[0])
        return self._lb_entries(entries, self.span(self.lines[entries[0][0]]))

    def _lb_entries(self, entries, span):
        groups: dict[str, dict] = {}
        order: list[str] = []
        for row, *conts in entries:
            ln = self.lines[row]
            words = ln.text.split()
            key = words[0]
            rest = ln.text[len(key):].strip()
            slot = None
            ms = re.match(r"^\((\d+)\)\s+", rest)
            if ms:  # 1.16+: the service key carries its slot
                slot = int(ms.group(1))
                rest = rest[ms.end():]
            if key not in groups:
                try:
                    fe, scope = parse_endpoint(key)
                except AddrError as ex:
                    self.addr_error(ln, key, ex)
                    continue
                groups[key] = {"fe": fe, "scope": scope, "backends": [], "flags": None, "revnat": None,
                               "l7": None, "span": self.span(ln, key)}
                order.append(key)
            g = groups[key]
            self._lb_value(ln, rest, g, key_slot=slot)
            for c in conts:
                cl = self.lines[c]
                self._lb_value(cl, cl.text, g, key_slot=None)
        services = []
        for key in order:
            g = groups[key]
            flags = g["flags"]
            fl = frozenset(flags or ())
            stype = next((f for f in (flags or ()) if f in SERVICE_TYPES), None)
            ext = int_ = None
            if flags is not None:  # 1.7+ prints the flags: their absence means Cluster
                ext = "Local" if "Local" in fl else "Cluster"
                int_ = "Local" if "InternalLocal" in fl else "Cluster"
            services.append(Service(
                g["fe"], stype, tuple(g["backends"]), id=g["revnat"], scope=g["scope"], flags=fl,
                ext_policy=ext, int_policy=int_, revnat_id=g["revnat"], l7_proxy_port=g["l7"],
                span=g["span"]))
        return Listing("bpf-lb-list", tuple(services), span=span)

    def _lb_value(self, ln: _Line, text: str, g: dict, key_slot):
        flags = None
        mf = self._FLAGS.search(text)
        if mf:
            flags = tuple(f.strip() for f in mf.group(1).split(",") if f.strip())
            text_main = text[:mf.start()]
            tail = text[mf.end():]
        else:
            text_main, tail = text, ""
        m7 = self._L7.search(tail)
        if m7:
            g["l7"] = int(m7.group(1))
            tail = tail[:m7.start()] + tail[m7.end():]
        if tail.strip():
            col, end = self._tok_span(ln, tail.strip())
            self.diag(ln, col, end, "PRS201", f"unexpected text after the flags: '{tail.strip()}'")
        words = text_main.split()
        if not words:
            return
        addr = words[0]
        nums = []
        for w in words[1:]:
            if re.fullmatch(r"\(\d+\)", w):
                nums.append(int(w[1:-1]))
            else:
                col, end = self._tok_span(ln, w)
                self.diag(ln, col, end, "PRS201", f"unexpected cell '{w}' in a bpf lb list entry",
                          "an entry is: BACKEND (REVNAT_ID) [(SLOT)] [FLAGS]")
                return
        try:
            ep, _ = parse_endpoint(addr)
        except AddrError as ex:
            self.addr_error(ln, addr, ex)
            return
        revnat = nums[0] if nums else None
        slot = nums[1] if len(nums) > 1 else key_slot
        master = (ep.address.is_unspecified and ep.port == 0) or slot == 0
        if master:
            # the master entry (slot 0) carries the service's flags; its revnat is the service's
            # (before 1.7 it printed (0), which is no revnat id)
            if flags is not None:
                g["flags"] = flags
            if revnat:
                g["revnat"] = revnat
            return
        if revnat and g["revnat"] is None:
            g["revnat"] = revnat
        g["backends"].append(Backend(ep, index=slot, span=self.span(ln, addr)))

    # revnat ------------------------------------------------------------------------
    def _revnat_list(self, node):
        n = node.children[0].value
        out = []
        for r in node.children[1:]:
            ln = self.lines[r.value]
            rid, addr = ln.text.split()
            try:
                ep, _ = parse_endpoint(addr)
            except AddrError as e:
                self.addr_error(ln, addr, e)
                continue
            out.append(RevNat(int(rid), ep, self.span(ln, addr)))
        return Listing("revnat", revnat=tuple(out), span=self.span(self.lines[n]))

    # statedb tables ------------------------------------------------------------------
    def _cells(self, ln: _Line, cols) -> dict | None:
        raw = ln.raw
        out = {}
        for i, (name, start) in enumerate(cols):
            end = cols[i + 1][1] if i + 1 < len(cols) else len(raw)
            if start > 0 and start < len(raw) and not raw[start - 1].isspace() and not raw[start].isspace():
                self.diag(ln, start + 1, start + 2, "PRS205",
                          f"the cell under '{name}' starts inside the previous cell",
                          "statedb tables are aligned to their header: paste them unwrapped")
                return None
            out[name] = raw[start:end].strip() if start < len(raw) else ""
        return out

    def _db_table(self, node):
        head = node.children[0]
        n, cols = head.value
        names = [c[0] for c in cols]
        rows = []
        for r in node.children[1:]:
            ln = self.lines[r.value[0]]
            cells = self._cells(ln, cols)
            if cells is not None:
                rows.append((ln, cells))
        span = self.span(self.lines[n])
        if "Type" in names and "Address" in names:
            return Listing("frontends", tuple(s for ln, c in rows if (s := self._frontend_row(ln, c))), span=span)
        if names[0] == "Name" and "Source" in names:
            return Listing("services", service_meta=tuple(m for ln, c in rows if (m := self._service_row(ln, c))),
                           span=span)
        if "Address" in names and "NodePort" in names:
            out = []
            for ln, c in rows:
                try:
                    a = _ip(c["Address"])
                except ValueError:
                    self.diag(ln, ln.col, ln.col + len(c["Address"]), "PRS202", f"not an IP address '{c['Address']}'")
                    continue
                out.append(NodeAddress(a, c.get("NodePort") == "true", c.get("Primary") == "true",
                                       c.get("DeviceName") or None, self.span(ln)))
            return Listing("node-addresses", node_addresses=tuple(out), span=span)
        if "Address" in names:
            out = []
            for ln, c in rows:
                try:
                    ep, _ = parse_endpoint(c["Address"])
                except AddrError as e:
                    self.addr_error(ln, c["Address"], e)
                    continue
                inst = c.get("Instances") or c.get("Service") or ""
                svcs = tuple(x.strip().split(" (")[0] for x in inst.split(", ") if x.strip())
                out.append(TableBackend(ep, svcs, c.get("NodeName") or None,
                                        (c.get("State") or "").lower() or None, self.span(ln)))
            return Listing("backends", backends=tuple(out), span=span)
        self.diag(self.lines[n], 1, len(self.lines[n].raw) + 1, "PRS201",
                  f"a table synack does not know (columns {', '.join(names)})")
        return None

    def _frontend_row(self, ln: _Line, c: dict) -> Service | None:
        try:
            fe, scope = parse_endpoint(c["Address"])
        except AddrError as e:
            self.addr_error(ln, c["Address"], e)
            return None
        backends = []
        for i, b in enumerate(x.strip() for x in (c.get("Backends") or "").split(", ") if x.strip()):
            parts = b.split()
            try:
                ep, _ = parse_endpoint(parts[0])
            except AddrError as e:
                self.addr_error(ln, parts[0], e)
                continue
            state = parts[1].strip("()").lower() if len(parts) > 1 else None
            backends.append(Backend(ep, state=state, index=i + 1, span=self.span(ln, parts[0])))
        name = c.get("ServiceName") or None
        return Service(fe, c.get("Type") or None, tuple(backends), scope=scope, name=name,
                       port_name=c.get("PortName") or None, span=self.span(ln, c["Address"]))

    def _service_row(self, ln: _Line, c: dict):
        tp = c.get("TrafficPolicy") or ""
        ext = int_ = None
        if tp in ("Cluster", "Local"):
            ext = int_ = tp
        else:
            for part in tp.split(","):
                k, _, v = part.strip().partition("=")
                if k == "Ext":
                    ext = v
                elif k == "Int":
                    int_ = v
        ranges = []
        for f in (c.get("Flags") or "").split(", "):
            k, _, v = f.partition("=")
            if k.strip() == "SourceRanges":
                for r in v.split():
                    try:
                        ranges.append(ipaddress.ip_network(r.strip(","), strict=False))
                    except ValueError:
                        col, end = self._tok_span(ln, r)
                        self.diag(ln, col, end, "PRS202", f"not a network '{r}'")
        return (c.get("Name"), ext, int_, tuple(ranges), c.get("Flags") or "", self.span(ln))

    # lbmaps dump ------------------------------------------------------------------------
    _KV = re.compile(r"(\w+)=(\S+)")

    def _map_dump(self, node):
        bes: dict[int, tuple] = {}
        revs: list[RevNat] = []
        ranges: dict[int, list] = {}
        svcs: dict[tuple, dict] = {}
        order = []
        for t in node.children:
            ln = self.lines[t.value]
            kind, _, body = ln.text.partition(": ")
            flags = None
            if " FLAGS=" in body or body.startswith("FLAGS="):
                body, _, flags = body.partition("FLAGS=")
            kv = dict(self._KV.findall(body))
            try:
                if kind == "BE":
                    ep, _ = parse_endpoint(kv["ADDR"])
                    bes[int(kv["ID"])] = (ep, (kv.get("STATE") or "").lower() or None, self.span(ln, kv["ADDR"]))
                elif kind == "REV":
                    ep, _ = parse_endpoint(kv["ADDR"])
                    revs.append(RevNat(int(kv["ID"]), ep, self.span(ln, kv["ADDR"])))
                elif kind == "SRCRANGE":
                    ranges.setdefault(int(kv["ID"]), []).append(ipaddress.ip_network(kv["CIDR"], strict=False))
                elif kind == "SVC":
                    ep, scope = parse_endpoint(kv["ADDR"])
                    k = (kv["ADDR"], int(kv["ID"]))
                    if k not in svcs:
                        svcs[k] = {"fe": ep, "scope": scope, "id": int(kv["ID"]), "slots": [], "flags": (),
                                   "span": self.span(ln, kv["ADDR"])}
                        order.append(k)
                    fl = tuple(f for f in (flags or "").strip().split("+") if f)
                    if int(kv["SLOT"]) == 0:
                        svcs[k]["flags"] = fl
                    else:
                        svcs[k]["slots"].append((int(kv["SLOT"]), int(kv["BEID"]), ln))
                else:
                    pass  # AFF:, MAGLEV: ... entries: not modelled
            except AddrError as e:
                self.addr_error(ln, kv.get("ADDR", ""), e)
            except (KeyError, ValueError) as e:
                self.diag(ln, ln.col, len(ln.raw) + 1, "PRS201", f"malformed {kind} entry ({e})")
        services = []
        for k in order:
            g = svcs[k]
            if g["fe"].port == 0 and g["fe"].protocol == "ANY":
                # the wildcard entry a ClusterIP/LoadBalancer address gets so that other ports are
                # dropped (cilium#36236): no frontend a client can use
                continue
            backends = []
            for slot, beid, ln in sorted(g["slots"], key=lambda x: x[:2]):  # a slot twice: no _Line order
                be = bes.get(beid)
                if be is None:
                    self.diag(ln, ln.col, len(ln.raw) + 1, "PRS201", f"SVC slot {slot} names backend {beid}, "
                              "which no BE entry defines")
                    continue
                backends.append(Backend(be[0], state=be[1], index=slot, backend_id=beid, span=be[2]))
            fl = frozenset(g["flags"])
            stype = next((f for f in g["flags"] if f in SERVICE_TYPES), None)
            services.append(Service(
                g["fe"], stype, tuple(backends), id=g["id"], scope=g["scope"], flags=fl,
                ext_policy="Local" if "Local" in fl else "Cluster",
                int_policy="Local" if "InternalLocal" in fl else "Cluster",
                source_ranges=tuple(ranges.get(g["id"], ())) if "check source-range" in fl else (),
                revnat_id=g["id"], span=g["span"]))
        first = self.lines[node.children[0].value]
        table_be = tuple(TableBackend(ep, (), None, st, sp) for ep, st, sp in bes.values())
        return Listing("lbmaps", tuple(services), backends=table_be, revnat=tuple(revs), span=self.span(first))

    # status -------------------------------------------------------------------------------
    def _status_report(self, node):
        lines = [self.lines[t.value] for t in node.children]
        return Listing("status", status=parse_status(lines, self.span(lines[0])), span=self.span(lines[0]))


def _onoff(v: str) -> bool | None:
    v = v.strip().split()[0].lower() if v.strip() else ""
    if v in ("enabled", "true"):
        return True
    if v in ("disabled", "false"):
        return False
    return None


def parse_status(lines, span: Span | None) -> CiliumStatus:
    """``cilium status [--verbose]`` lines -> CiliumStatus (what it shows; None for the rest)."""
    st: dict = {"devices": (), "services_enabled": ()}
    joined = []
    for ln in lines:  # tabwriter wraps a long value onto indented lines with no key
        text = ln.text if hasattr(ln, "text") else ln
        col = ln.col if hasattr(ln, "col") else 1
        open_bracket = joined and joined[-1][1].count("[") > joined[-1][1].count("]")
        if joined and col > 1 and (open_bracket or (not _STATUS_KEY.match(text) and not text.startswith("- ")
                                                    and not joined[-1][1].endswith(":"))):
            joined[-1] = (joined[-1][0], joined[-1][1] + " " + text)
        else:
            joined.append((col, text))
    in_kpr = False
    services = []
    for col, text in joined:
        key, _, val = text.partition(":")
        key, val = key.strip(), val.strip()
        if key == "KubeProxyReplacement Details":
            in_kpr = True
            continue
        if col == 1:
            in_kpr = False
        if key.startswith("- ") and in_kpr:
            services.append((key[2:].strip(), bool(_onoff(val))))
            continue
        if key == "Cilium" and not in_kpr:
            m = re.search(r"\b(\d+\.\d+\.\d+[\w.-]*)", val)
            if m:
                st["version"] = m.group(1)
        elif key == "KubeProxyReplacement" and not in_kpr:
            word = val.split()[0] if val.split() else None
            st["kpr"] = word
            feats = val[len(word or ""):]
            if "HostReachableServices" in feats:
                st["socket_lb"] = True  # the pre-1.12 name of socket-level LB
            elif re.search(r"\[[^\]]*(NodePort|ExternalIPs)", feats):
                st.setdefault("socket_lb", False)
            m = re.search(r"NodePort \((SNAT|DSR|Hybrid)", feats)
            if m:
                st["lb_mode"] = m.group(1)
        elif in_kpr and key == "Status":
            st["kpr"] = val.split()[0] if val else None
        elif in_kpr and key == "Socket LB":
            st["socket_lb"] = _onoff(val)
        elif in_kpr and key == "Socket LB Coverage":
            st["socket_lb_hostns_only"] = val.lower().startswith("hostns")
        elif in_kpr and key == "Mode":
            st["lb_mode"] = val.split()[0] if val else None
        elif in_kpr and key == "Devices":
            st["devices"] = tuple(d.split()[0] for d in val.split(",") if d.strip())
        elif in_kpr and key == "NAT46/64 Support":
            st["nat46x64"] = _onoff(val)
        elif key == "Host Routing":
            st["host_routing"] = val.split()[0] if val else None
        elif key == "Masquerading":
            st["masquerading"] = val.split()[0] if val else None
    if services:
        st["services_enabled"] = tuple(services)
    if st.get("socket_lb") and "socket_lb_hostns_only" not in st:
        st["socket_lb_hostns_only"] = None
    return CiliumStatus(span=span, **st)


# ------------------------------------------------------------------------------ JSON
def _json_service(obj, sf: SourceFile, line: int, diags: list) -> Service | None:
    spec = obj.get("spec") if isinstance(obj, dict) else None
    if spec is None and isinstance(obj, dict) and "frontend-address" in obj:
        spec = obj
    if not isinstance(spec, dict) or "frontend-address" not in spec:
        diags.append(Diagnostic("PRS204", Severity.ERROR, "a JSON element without spec.frontend-address",
                                Span(sf.path, line, 1, 2), "give `cilium service list -o json` output",
                                sf.line(line), name=PARSE_CODES["PRS204"][0]))
        return None
    span = Span(sf.path, line, 1, len(sf.line(line)) + 1)

    def ep_of(d):
        a = _ip(d["ip"])
        proto = d.get("protocol")
        proto = proto.upper() if proto and proto.upper() != "NONE" else None
        return Endpoint(a, int(d.get("port") or 0), proto)

    try:
        fa = spec["frontend-address"]
        fe = ep_of(fa)
        flags = spec.get("flags") or {}
        backends = []
        for i, b in enumerate(spec.get("backend-addresses") or ()):
            backends.append(Backend(ep_of(b), state=(b.get("state") or None), weight=b.get("weight"),
                                    node=b.get("nodeName") or None, preferred=b.get("preferred"),
                                    index=i + 1, backend_id=b.get("id"), span=span))
    except (KeyError, TypeError, ValueError) as e:
        diags.append(Diagnostic("PRS204", Severity.ERROR, f"a service element that does not parse ({e})",
                                span, None, sf.line(line), name=PARSE_CODES["PRS204"][0]))
        return None
    tp = flags.get("trafficPolicy")
    name = "/".join(x for x in (flags.get("namespace"), flags.get("name")) if x) or None
    return Service(fe, flags.get("type"), tuple(backends), id=spec.get("id"),
                   scope=fa.get("scope") or "external", name=name,
                   ext_policy=flags.get("extTrafficPolicy") or tp, int_policy=flags.get("intTrafficPolicy") or (
                       "Cluster" if tp else None),
                   revnat_id=spec.get("id"), span=span)


def parse_json(sf: SourceFile, text: str, diags: list) -> list[Listing]:
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        diags.append(Diagnostic("PRS204", Severity.ERROR, "no JSON in the input", Span(sf.path, 1, 1, 2),
                                None, sf.line(1), name=PARSE_CODES["PRS204"][0]))
        return []
    dec = json.JSONDecoder()

    seen = [0, 1]  # elements come in file order: count the newlines since the last one

    def line_of(pos: int) -> int:
        if pos < seen[0]:
            return text.count("\n", 0, pos) + 1
        seen[1] += text.count("\n", seen[0], pos)
        seen[0] = pos
        return seen[1]

    services = []
    try:
        if text[start] == "[":
            pos = start + 1
            while True:
                while pos < len(text) and text[pos] in " \t\r\n,":
                    pos += 1
                if pos >= len(text) or text[pos] == "]":
                    break
                obj, end = dec.raw_decode(text, pos)
                s = _json_service(obj, sf, line_of(pos), diags)
                if s is not None:
                    services.append(s)
                pos = end
        else:
            obj, _ = dec.raw_decode(text, start)
            s = _json_service(obj, sf, line_of(start), diags)
            if s is not None:
                services.append(s)
    except json.JSONDecodeError as e:
        ln = line_of(e.pos)
        col = e.pos - (text.rfind("\n", 0, e.pos) + 1) + 1
        diags.append(Diagnostic("PRS204", Severity.ERROR, f"invalid JSON: {e.msg}", Span(sf.path, ln, col, col + 1),
                                None, sf.line(ln), name=PARSE_CODES["PRS204"][0]))
    return [Listing("json", tuple(services), span=Span(sf.path, line_of(start), 1, 2))]


# ------------------------------------------------------------------------------ entry points
_TXTAR_FILE = re.compile(r"^-- (.+) --$")


def detect_cilium(text: str) -> str | None:
    """``json``, ``txtar`` or ``text`` when the input is a Cilium dump, else None.

    >>> detect_cilium("ID   Frontend     Service Type   Backend\\n")
    'text'
    >>> detect_cilium("*nat\\n:PREROUTING ACCEPT [0:0]\\nCOMMIT\\n") is None
    True
    """
    head = text[:20000]
    if re.search(r"^-- \S+ --$", head, re.M) and re.search(r"^(?:#!|hive |db/|k8s/|lb/)", head, re.M):
        return "txtar"
    body = head.lstrip()
    if body.startswith("Defaulted container"):
        body = body.split("\n", 1)[1].lstrip() if "\n" in body else ""
    if body[:1] in "[{" and '"frontend-address"' in head:
        return "json"
    for raw in head.splitlines()[:400]:
        s = raw.strip()
        if (_SVC_HEADER.match(s) or _LB_HEADER.match(s) or _REVNAT_HEADER.match(s) or _MAP_ENTRY.match(s)
                or s.startswith(("KubeProxyReplacement", "KVStore:"))
                or (_GET_FRONTEND.match(s) and _is_addr(s.split()[0]))
                or re.match(r"^\d+\s+\S+:\d+(?:/\w+)*\s+[A-Z][A-Za-z]+(\s|$)", s)):
            return "text"
    return None


@dataclass
class CiliumParseResult:
    dump: CiliumDump
    diagnostics: tuple[Diagnostic, ...]
    files: tuple[SourceFile, ...] = ()
    format: str = "cilium"

    @property
    def errors(self) -> int:
        return sum(1 for d in self.diagnostics if d.severity == Severity.ERROR)


def parse_cilium(text: str, path: str, kind: str | None = None) -> CiliumParseResult:
    """Parse one Cilium dump (any kind :func:`detect_cilium` names)."""
    sf = SourceFile.from_text(text, path)
    diags: list[Diagnostic] = []
    detected = detect_cilium(text)
    kind = kind or detected or "text"
    if kind == "json":
        listings = parse_json(sf, text.replace("\r\n", "\n") if "\r" in text else text, diags)
    elif kind == "txtar":
        listings = []
        starts = [(i + 1, m.group(1)) for i, line in enumerate(sf.lines) if (m := _TXTAR_FILE.match(line))]
        for j, (n, name) in enumerate(starts):
            last = (starts[j + 1][0] - 1) if j + 1 < len(starts) else len(sf.lines)
            if not name.endswith((".table", ".expected")):
                continue  # YAML objects and the script: the test's inputs, not a dump
            listings += _Builder(sf, diags, section=name).build(n + 1, last)
    else:
        listings = _Builder(sf, diags).build(1, len(sf.lines))
        if not listings and (not diags or detected is None):
            diags = []  # one error for the input, not one per line of something else
            diags.append(Diagnostic("PRS200", Severity.ERROR, "no Cilium table in the input",
                                    Span(path, 1, 1, 2), PARSE_CODES["PRS200"][1], sf.line(1),
                                    name=PARSE_CODES["PRS200"][0]))
    diags.sort(key=lambda d: d.sort_key())
    return CiliumParseResult(CiliumDump(path, kind, tuple(listings)), tuple(diags), (sf,), kind)


def join_statedb(frontends: Listing, services: Listing | None = None, backends: Listing | None = None
                 ) -> tuple[Service, ...]:
    """The statedb frontends table completed from the services table (traffic policies, source
    ranges) and the backends table (node, state): what ``db/show`` prints in three tables."""
    meta = {m[0]: m for m in (services.service_meta if services else ())}
    bmap = {}
    for b in (backends.backends if backends else ()):
        for s in b.services or ("",):
            bmap[(b.endpoint, s)] = b
        bmap.setdefault((b.endpoint, None), b)
    out = []
    for s in frontends.services:
        m = meta.get(s.name)
        bs = []
        for b in s.backends:
            tb = bmap.get((b.endpoint, s.name)) or bmap.get((b.endpoint, None))
            if tb is not None:
                b = replace(b, node=tb.node, state=b.state or tb.state)
            bs.append(b)
        if m is not None:
            s = replace(s, ext_policy=m[1], int_policy=m[2], source_ranges=m[3] if m[3] else ())
        out.append(replace(s, backends=tuple(bs)))
    return tuple(out)
