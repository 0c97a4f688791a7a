"""The parse's fast paths give what the plain decode gives: compiled rule shapes (see
analyzer/parse/iptables.py, _compile_shape) and the restore-only check modules of `synack parse`."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from analyzer.parse import iptables as I
from analyzer.parse import load_ruleset

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus"))


def _parse(text: str, mode: str, monkeypatch, path: str = "shapes.rules"):
    """Rules and diagnostics of ``text`` decoded rule by rule ('plain'), with decode plans
    ('plans') or with plans compiled to code ('compiled', the default)."""
    with monkeypatch.context() as m:
        if mode != "compiled":
            m.setattr(I.Builder, "compile_shapes", False)
        if mode == "plain":
            m.setattr(I.Builder, "_replay", lambda self, *a: I._NO_PLAN)
        res = load_ruleset((text, path))
    return [([(x.table, x.chain, x.index, x.matches, x.target, x.span, x.text, x.counters)
              for x in r.ruleset.rules()],
             [(d.code, d.severity, d.message, d.span, d.hint, d.source_line) for d in r.diagnostics])
            for r in res.families()]


def _count_compiled(monkeypatch) -> list[int]:
    """[rules the compiled shapes decoded, rules they handed back to the plan's replay]."""
    hits = [0, 0]
    compile_shape = I._compile_shape

    def counting(*a):
        cp = compile_shape(*a)
        if cp is not None:
            decode = cp.decode

            def counted(*x):
                r = decode(*x)
                hits[r is I._NO_PLAN] += 1
                return r
            cp.decode = counted
        return cp
    monkeypatch.setattr(I, "_compile_shape", counting)
    return hits


KUBE = ('-A KUBE-SEP-{k} -s 10.244.{k}.5/32 -m comment --comment "ns/svc-{k}:http" -j KUBE-MARK-MASQ\n'
        '-A KUBE-SEP-{k} -p tcp -m comment --comment "ns/svc-{k}:http" -m tcp -j DNAT '
        '--to-destination 10.244.{k}.5:80{k}\n'
        '-A KUBE-SVC-{k} -m comment --comment "ns/svc-{k} -> 10.244.{k}.5:80" -m statistic --mode random '
        '--probability 0.{k} -j KUBE-SEP-{k}\n'
        '-A KUBE-SVC-{k} ! -i eth{k} -p udp -m udp --dport 53{k} -j ACCEPT\n'
        '-A KUBE-SVC-{k} -s 10.{k}.0.0/16 -j DROP\n'
        '-A KUBE-SVC-{k} -f -o veth{k} -c {k} 2{k} -m comment --comment svc{k} -j RETURN\n'
        '-A KUBE-SVC-{k} ! -d 10.{k}.0.1 -p tcp -m tcp ! --sport 1:{k} -m addrtype --dst-type LOCAL '
        '-j REJECT --reject-with tcp-reset\n'
        '-A KUBE-SEP-{k} -m addrtype --dst-type LOCAL --limit-iface-in -m addrtype ! --src-type LOCAL,UNICAST '
        '-j KUBE-SVC-{k}\n')
BAD = ["300.1.1.1", "db.example", "10.0.0.0/33", "eth000000000000000", "99999", "1.5", "x", "2:1",
       "10.0.0.1,10.0.0.2", "fe80::1", "10.244.1.5:70000", "0x10", "X.X.X.X", "KUBE-SVC-1", "DROP",
       "ACCEPT", "NOPE", "LOCALE", '"a b"', '""', "-x", "!", "http", "KUBE-MARK-MASQ"]


def _kube_text(seed: int, share: float) -> str:
    rng = random.Random(seed)
    lines = []
    for k in range(1, 60):
        for line in KUBE.format(k=k).splitlines():
            if k > 2 and rng.random() < share:
                words = line.split(" ")
                words[rng.randrange(2, len(words))] = rng.choice(BAD)
                line = " ".join(words)
            lines.append(line)
    decl = "".join(f":KUBE-SEP-{k} - [0:0]\n:KUBE-SVC-{k} - [0:0]\n" for k in range(1, 60))
    return "*nat\n" + decl + ":KUBE-MARK-MASQ - [0:0]\n" + "\n".join(lines) + "\nCOMMIT\n"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compiled_shapes_decode_as_each_rule_alone(seed, monkeypatch):
    # compiled code reads a rule's words and columns from one regular expression match; any value
    # it does not take as the plan does (a refused port, a host name, a list of addresses, a
    # jump target of another kind) goes back to the replay, which reports it
    text = _kube_text(seed, 0.3)
    hits = _count_compiled(monkeypatch)
    compiled = _parse(text, "compiled", monkeypatch)
    assert hits[0] > 150 and hits[1] > 0  # the compiled code ran, and handed some rules back
    assert len(compiled[0][1]) > 30  # the mutated values are reported
    assert compiled == _parse(text, "plans", monkeypatch) == _parse(text, "plain", monkeypatch)


def test_compiled_shapes_keep_columns_of_quoted_and_bare_values(monkeypatch):
    text = ("*filter\n:X - [0:0]\n"
            '-A X -s 10.0.0.1/32 -m comment --comment "a b" -j ACCEPT\n'
            '-A X -s 10.0.0.22/32 -m comment --comment ab -j ACCEPT\n'
            '-A X -s 10.0.0.3/32 -m comment --comment "c d e" -j ACCEPT\n'
            '-A X -s 10.0.0.4/32 -m comment --comment cd -j ACCEPT\n'
            '-A X -s 10.0.0.5/32 -m comment --comment "x -y" -j DROP\n'
            '-A X -s 10.0.0.6/32 -m comment --comment "x -y" -j X\n'
            "COMMIT\n")
    hits = _count_compiled(monkeypatch)
    compiled = _parse(text, "compiled", monkeypatch)
    assert hits[0] >= 1
    assert compiled == _parse(text, "plain", monkeypatch)
    rules = compiled[0][0]
    assert [(m.col, m.end_col) for m in rules[2][3]] == [(6, 20), (32, 49)]
    assert rules[2][3][1].text == "c d e"


def test_compiled_rules_are_numbered_again_after_edits(monkeypatch):
    # a compiled shape numbers its Rule as appended; -I, -D, -R, -E, -F and a chain declared
    # again (which empties it) move, drop or rename rules: result() numbers them again, as for
    # the rules every other way appends
    rule = '-A {c} -s 10.0.{k}.1/32 -m comment --comment "svc {k}" -j {t}\n'
    first = "".join(rule.format(c=c, k=k, t="KUBE-MARK-MASQ") for c in ("A", "B", "C", "D", "E")
                    for k in range(6))
    text = ("*nat\n:A - [0:0]\n:B - [0:0]\n:C - [0:0]\n:D - [0:0]\n:E - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n"
            + first
            + "-I A 2 -s 10.9.9.9/32 -j KUBE-MARK-MASQ\n"
            + '-D B -s 10.0.3.1/32 -m comment --comment "svc 3" -j KUBE-MARK-MASQ\n-D B 1\n'
            + "-R C 4 -s 10.8.8.8/32 -j KUBE-MARK-MASQ\n-E D F\n-F E\n"
            + rule.format(c="A", k=7, t="B") + rule.format(c="F", k=8, t="A") + rule.format(c="E", k=9, t="C")
            + ":B - [0:0]\n" + rule.format(c="B", k=5, t="A") + "COMMIT\n")
    hits = _count_compiled(monkeypatch)
    compiled = _parse(text, "compiled", monkeypatch)
    assert hits[0] > 20
    assert compiled == _parse(text, "plain", monkeypatch)
    rules = compiled[0][0]
    assert [(c, i) for _, c, i, *_ in rules if c == "A"] == [("A", k) for k in range(1, 9)]
    assert {c for _, c, *_ in rules} == {"A", "B", "C", "E", "F"}


def _lazy(text: str, mode: str, monkeypatch, order=None, path: str = "shapes.rules"):
    """Rules (matches, target) and every diagnostic of ``text`` parsed lazily, as explain loads a
    dump, each rule then decoded on first use (in ``order`` of rule numbers, or in order);
    ``mode`` as for _parse: the decode on first use takes compiled shapes, plans or neither."""
    with monkeypatch.context() as m:
        if mode != "compiled":
            m.setattr(I.Builder, "compile_shapes", False)
        if mode == "plain":
            m.setattr(I.Builder, "_replay", lambda self, *a: I._NO_PLAN)
        res = load_ruleset((text, path), lazy=True)
        rules = list(res.ruleset.rules())
        for k in order or range(len(rules)):
            rules[k].matches
    diags = [(d.code, d.severity, d.message, d.span, d.hint, d.source_line)
             for d in res.diagnostics + res.late_diagnostics()]
    return ([(x.table, x.chain, x.index, x.matches, x.target, x.span, x.text) for x in rules],
            sorted(diags, key=repr))


ODD = ('-A KUBE-SVC-1 -m comment --comment "a \\"quoted\\" word" -j ACCEPT\n'
       '-A KUBE-SVC-1 -m comment --comment "x -y" -j ACCEPT\n'
       "-A KUBE-SVC-1 ! -s 10.1.0.0/16 ! -d 10.2.0.1/32 -j KUBE-MARK-MASQ\n"
       "-A KUBE-SVC-1 -d 10.2.0.1/32 ! -p tcp -j KUBE-MARK-MASQ\n"
       "-A KUBE-SVC-1 -p tcp -m tcp --dport 99999 -j ACCEPT\n"
       "-A KUBE-SVC-1 -p tcp -m tcp --dport 99999 -j ACCEPT\n"
       "-A KUBE-SVC-1 -m set --match-set nope src -j DROP\n"
       "-A KUBE-SVC-1 -j NOSUCH\n"
       "-A KUBE-SVC-1 -d 10.0.0.1 -j DNAT --to-destination 10.0.0.2:80 --random\n")


@pytest.mark.parametrize("seed", [1, 2])
def test_lazily_decoded_rules_equal_eagerly_decoded_ones(seed, monkeypatch):
    # explain loads a dump lazily: a rule's options are decoded on first use, by the compiled
    # shapes learnt from the rules decoded before it (in whatever order the walk reads them),
    # and must give what the eager parse gives, diagnostics included
    text = _kube_text(seed, 0.3).replace("COMMIT\n", ODD + "COMMIT\n")
    eager = _parse(text, "compiled", monkeypatch)[0]
    eager = ([x[:7] for x in eager[0]], sorted(eager[1], key=repr))
    order = list(range(len(eager[0])))
    random.Random(seed).shuffle(order)
    hits = _count_compiled(monkeypatch)
    for walk in (None, order):
        lazy = _lazy(text, "compiled", monkeypatch, walk)
        assert lazy[0] == eager[0]
        # a late diagnostic does not say how often the file repeats its value (the eager parse
        # counts the repeats at its end): compared without the message
        assert [d[:2] + d[3:] for d in lazy[1]] == [d[:2] + d[3:] for d in eager[1]]
        assert lazy == _lazy(text, "plain", monkeypatch, walk)  # what the decode gave before shapes
    assert hits[0] > 300 and hits[1] > 0  # the compiled shapes decoded most rules, handed some back
    assert len(eager[1]) > 30


def test_lazy_rules_of_several_files_report_in_their_own_file():
    # one decoder per file and table: a lazily decoded rule's diagnostic names its own file and line
    a = "*filter\n:X - [0:0]\n-A X -s 10.0.0.1/32 -j ACCEPT\n-A X -p tcp --dport 99999 -j DROP\nCOMMIT\n"
    b = "*filter\n-A X -s 10.0.0.2/32 -j ACCEPT\n-A X -p tcp --dport 88888 -j DROP\nCOMMIT\n"
    inputs = [(a, "a.rules"), (b, "b.rules")]
    eager = load_ruleset(inputs, noflush=True)
    lazy = load_ruleset(inputs, noflush=True, lazy=True)
    assert [(r.matches, r.target) for r in lazy.ruleset.rules()] == \
        [(r.matches, r.target) for r in eager.ruleset.rules()]
    assert [(d.code, d.span, d.source_line) for d in lazy.late_diagnostics()] == \
        [(d.code, d.span, d.source_line) for d in eager.diagnostics] == \
        [("PRS004", I._new_Span("a.rules", 4, 21, 26), "-A X -p tcp --dport 99999 -j DROP"),
         ("PRS004", I._new_Span("b.rules", 3, 21, 26), "-A X -p tcp --dport 88888 -j DROP")]


def test_restore_checks_live_in_the_modules_parse_imports():
    from analyzer.checks import RESTORE_MODULES, load_all

    restore = {code: info.func.__module__ for code, info in load_all().items() if info.restore}
    assert restore and all(mod.rsplit(".", 1)[1] in RESTORE_MODULES for mod in restore.values()), restore


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
def test_compiled_shapes_agree_on_the_corpus(monkeypatch):
    hits = _count_compiled(monkeypatch)
    files = [p for folder in ("iptables", "k8s", "nft") for p in sorted((CORPUS / folder).rglob("*"))
             if p.is_file() and not p.name.startswith(".") and p.suffix != ".json"]
    assert len(files) > 100
    for p in files:
        with open(p, encoding="utf-8", errors="surrogateescape", newline="") as f:
            text = f.read()
        assert _parse(text, "compiled", monkeypatch, str(p)) == _parse(text, "plans", monkeypatch, str(p)), p
    assert hits[0] > 20000


def test_ipv4_networks_built_from_integers_equal_the_ipaddress_ones():
    import ipaddress
    import pickle

    from analyzer.parse import options as O

    rng = random.Random(11)
    for _ in range(2000):
        ip, plen = rng.getrandbits(32), rng.randrange(33)
        fast, slow = O._v4_network(ip, plen), ipaddress.IPv4Network((ip, plen), strict=False)
        assert (fast, hash(fast), str(fast), fast.hostmask, fast.broadcast_address) == \
            (slow, hash(slow), str(slow), slow.hostmask, slow.broadcast_address)
        assert vars(fast).keys() == vars(slow).keys() and pickle.loads(pickle.dumps(fast)) == slow
        assert fast.subnet_of(slow) and slow.subnet_of(fast)
        a = O._v4_address(ip)
        assert (a, hash(a), str(a)) == (slow := ipaddress.IPv4Address(ip), hash(slow), str(slow))
    assert list(O._v4_network(0x0A000001, 32).hosts()) == [ipaddress.IPv4Address("10.0.0.1")]
    assert len(list(O._v4_network(0x0A000000, 31).hosts())) == 2


@pytest.mark.parametrize("text,expected", [
    ("10.0.0.1", ("10.0.0.1", "10.0.0.1", None, None)),
    ("10.0.0.1:80", ("10.0.0.1", "10.0.0.1", 80, 80)),
    ("10.0.0.1:80-90", ("10.0.0.1", "10.0.0.1", 80, 90)),
    ("10.0.0.1-10.0.0.5", ("10.0.0.1", "10.0.0.5", None, None)),
    ("10.0.0.1:90-80", "PRS006"), ("10.0.0.1:70000", "PRS006"), ("10.0.0.1:", "PRS006"),
    ("010.0.0.1:80", "PRS006"), ("10.0.0.256:80", "PRS006"),
])
def test_nat_ranges_of_the_usual_form_decode_as_the_general_way(text, expected):
    from analyzer.parse import options as O

    try:
        r = O._nat_range(text, O.Ctx(4))
        got = (str(r.addr_lo), str(r.addr_hi), r.port_lo, r.port_hi)
    except O.DecodeError as e:
        got = e.code
    assert got == expected


def test_fast_constructors_build_the_frozen_model_classes_themselves():
    """options.fast_constructor builds each frozen model class through a twin class and
    ``__class__`` assignment: the object is of the class itself, equal (and hashing equal) to
    what the class's own constructor builds, frozen, and pickles as the class."""
    import dataclasses
    import pickle

    from analyzer.model import rules as M
    from analyzer.parse import options as O
    from analyzer.source import Span

    classes = [Span] + [c for c in vars(M).values()
                        if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == M.__name__]
    assert len(classes) > 30
    for cls in classes:
        new = O.fast_constructor(cls)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        values = [(k, f"v{k}") for k in range(len(fields))]  # distinct, hashable, picklable
        got, want = new(*values), cls(*values)
        if sys.implementation.name == "cpython":  # the twin way, not the fallback
            assert "_twin" in new.__globals__, cls
        assert type(got) is cls and got == want and repr(got) == repr(want), cls
        assert all(getattr(got, f.name) == v for f, v in zip(fields, values)), cls
        if cls.__hash__ is not None:
            assert hash(got) == hash(want), cls
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(got, fields[0].name, None)
        assert pickle.loads(pickle.dumps(got)) == want, cls
        if len(fields) > 1 and fields[-1].default is not dataclasses.MISSING:  # defaults as the class's
            assert new(*values[:-1]) == cls(*values[:-1]), cls
    lazy = O.fast_constructor(M.Rule, omit=("matches", "target"))(
        "nat", "X", 1, Span("p", 1, 1, 5), "-A X", None, lambda rule: ((), None))
    assert type(lazy) is M.Rule and lazy.matches == () and lazy.target is None


def _address_like(rng) -> str:
    """A word that is, or nearly is, an IPv4 address, prefix or NAT range."""
    octet = lambda: rng.choice([str(rng.randrange(256)), str(rng.randrange(256, 999)), "0", "00", "01", "010",
                                "0x0a", "1e", "٣", "", " 1", "25"])  # noqa: E731
    parts = [octet() for _ in range(rng.choice([4, 4, 4, 4, 3, 2, 1, 5]))]
    s = ".".join(parts)
    s += rng.choice(["", "", f"/{rng.randrange(40)}", "/", "/08", "/٣", " x", "\x00"])
    return s


def test_fast_addresses_and_nat_ranges_agree_with_the_general_way():
    """The compiled shapes' dotted-quad shortcut (-s/-d) and the NAT range shortcut give what
    options.network and the general NAT range parse give, and leave anything else to them."""
    from analyzer.parse import options as O

    def no_shortcut(_):
        return None  # not a dotted quad: the general way decides

    def outcome(f, *a, **k):
        try:
            r = f(*a, **k)
        except O.DecodeError as e:
            return e.code
        return r if r is None else (r, str(r), sorted(vars(r)) if hasattr(r, "__dict__") else None)

    rng = random.Random(7)
    ctx = O.Ctx(4)
    for _ in range(20000):
        a = _address_like(rng)
        I._NETWORKS.pop(a, None)
        assert outcome(I._fast_network, a, ctx, 4) == outcome(O.network, a, ctx), a
        r = a.split("/")[0] + rng.choice(["", f":{rng.randrange(70000)}", f":{rng.randrange(9)}-{rng.randrange(9)}",
                                          ":", ":80-", ":08", ":٣", "-10.0.0.1", "-10.0.0.1:80"])
        assert outcome(O._nat_range, r, ctx) == outcome(O._nat_range, r, ctx, quad=no_shortcut), r


def test_addresses_with_non_ascii_digits_are_invalid_not_a_crash():
    """'٣' is a digit to a regular expression's \\d and to int(), not to inet_aton (OSError) nor
    to iptables: PRS005/PRS006, as any other invalid address, on every way of decoding."""
    text = ("*nat\n:PREROUTING ACCEPT [0:0]\n:X - [0:0]\n-A X -s 10.0.0.1/32 -j ACCEPT\n"
            "-A X -s 10.0.٣.1/32 -j ACCEPT\n-A X -p tcp -j DNAT --to-destination 10.0.0.1:80\n"
            "-A X -p tcp -j DNAT --to-destination 10.0.٣.1:80\n-A X -d ١.2.3.4 -j ACCEPT\nCOMMIT\n")
    res = load_ruleset((text, "digits.rules"))
    assert [(d.code, d.span.line) for d in res.diagnostics] == [("PRS005", 5), ("PRS006", 7), ("PRS005", 8)]


def test_table_names_are_the_star_lines_words():
    """_table_names finds each '*' at the start of a line (one-character find): the same names as
    looking for '\\n*', on random texts of stars, blanks, CRs and newlines."""
    def reference(text):
        names, i = [], 0 if text.startswith("*") else text.find("\n*")
        while i >= 0:
            start = i if text[i] == "*" else i + 1
            end = start + 1
            while end < len(text) and text[end] not in " \t\r\n":
                end += 1
            names.append(text[start + 1:end])
            i = text.find("\n*", end)
        return names

    rng = random.Random(5)
    for _ in range(20000):
        text = "".join(rng.choice(["*", "\n", "a", " ", "\r", "\t", "nat", "**"]) for _ in range(rng.randrange(14)))
        assert I._table_names(text) == reference(text), repr(text)
