"""Packet-set layer of the engine: behaviour of PacketSpace / PacketSet on hand-built sets."""
from __future__ import annotations

import ipaddress
import random

import pytest

from analyzer.engine import (
    CTSTATE_BITS, IFACE_NONE, IFACE_OTHER, LAYOUT, TCP_FLAG_BITS, Flow, IfaceOrderError,
    PacketSpace,
)

try:
    import dd.cudd  # noqa: F401
    BACKENDS = ["cudd", "autoref"]
except ImportError:  # pragma: no cover
    BACKENDS = ["autoref"]


@pytest.fixture(params=BACKENDS)
def space(request) -> PacketSpace:
    return PacketSpace(backend=request.param)


def flow(src="10.0.0.1", dst="10.0.0.2", **kw) -> Flow:
    return Flow(src, dst, **kw)


# ---- addresses ---------------------------------------------------------------------------------

def test_prefix_holds_first_and_last_address_and_nothing_beyond(space):
    net = space.prefix("dst", "192.168.1.0/24")
    assert flow(dst="192.168.1.0") in net
    assert flow(dst="192.168.1.255") in net
    assert flow(dst="192.168.0.255") not in net
    assert flow(dst="192.168.2.0") not in net
    assert flow(src="192.168.1.7") not in net  # the other address field


def test_prefix_ignores_host_bits_like_the_kernel(space):
    assert space.prefix("src", "10.1.2.3/8") == space.prefix("src", "10.0.0.0/8")
    assert space.prefix("src", ipaddress.ip_network("10.0.0.0/8")) == space.prefix("src", "10.0.0.0/8")


def test_slash_32_prefix_is_address_equality(space):
    assert space.prefix("dst", "10.96.0.1/32") == space.eq("dst", "10.96.0.1")
    assert space.prefix("dst", "10.96.0.1/32") == space.eq("dst", ipaddress.ip_address("10.96.0.1"))


def test_zero_length_prefix_is_the_whole_family(space):
    assert space.prefix("dst", "0.0.0.0/0") == space.family(4)
    assert space.prefix("dst", "::/0") == space.family(6)


def test_ipv4_and_ipv6_sets_are_distinct(space):
    v4 = space.eq("dst", "10.0.0.1")
    mapped = space.eq("dst", "::ffff:10.0.0.1")
    compat = space.eq("dst", "::10.0.0.1")  # same 128-bit value as the IPv4 encoding
    assert v4.isdisjoint(mapped)
    assert v4.isdisjoint(compat)
    assert space.family(4).isdisjoint(space.family(6))
    assert (space.family(4) | space.family(6)).is_full()


def test_ipv6_prefix(space):
    net = space.prefix("src", "2001:db8::/32")
    assert flow("2001:db8:ffff::1", "2001:db8::2") in net
    assert flow("2001:db9::1", "2001:db8::2") not in net
    assert net <= space.family(6)


def test_plain_int_address_is_the_128_bit_value_of_either_family(space):
    value = int(ipaddress.ip_address("10.0.0.1"))
    assert space.eq("dst", value) == space.eq("dst", "10.0.0.1") | space.eq("dst", "::10.0.0.1")
    big = int(ipaddress.ip_address("2001:db8::1"))
    assert space.eq("dst", big) == space.eq("dst", "2001:db8::1")


def test_address_range_with_addresses_fixes_family(space):
    r = space.range("src", "10.0.0.250", "10.0.1.5")
    assert flow(src="10.0.0.250") in r and flow(src="10.0.1.5") in r and flow(src="10.0.0.255") in r
    assert flow(src="10.0.0.249") not in r and flow(src="10.0.1.6") not in r
    assert r <= space.family(4)
    assert r.count() * 2**32 == 12 * space.family(4).count()


def test_noncontiguous_netmask_is_a_masked_match(space):
    m = space.masked("src", ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("255.0.0.255"))
    assert flow(src="10.77.1.5") in m
    assert flow(src="10.77.1.6") not in m
    assert m <= space.family(4)


# ---- ranges and ports -----------------------------------------------------------------------------

@pytest.mark.parametrize("lo, hi", [(0, 0), (65535, 65535), (0, 65535), (1, 65534), (0, 1023),
                                    (1024, 65535), (80, 80), (32768, 60999)])
def test_port_range_edges(space, lo, hi):
    r = space.range("dport", lo, hi)
    for port in {0, 1, lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, 65534, 65535}:
        if 0 <= port <= 65535:
            assert (flow(dport=port) in r) == (lo <= port <= hi), port
    assert r.count() * 2**16 == (hi - lo + 1) * space.universe().count()


def test_full_range_is_the_universe_and_reversed_range_is_empty(space):
    assert space.range("dport", 0, 65535).is_full()
    assert space.range("dport", 9, 8).is_empty()


def test_range_equals_union_of_values_brute_force(space):
    rng = random.Random(7)
    for _ in range(30):
        lo = rng.randrange(256)
        hi = rng.randrange(lo, 256)
        union = space.union(space.eq("proto", v) for v in range(lo, hi + 1))
        assert space.range("proto", lo, hi) == union, (lo, hi)


def test_value_outside_field_width_is_refused(space):
    with pytest.raises(ValueError):
        space.eq("dport", 65536)
    with pytest.raises(ValueError):
        space.range("proto", 0, 256)
    with pytest.raises(ValueError):
        space.eq("no_such_field", 1)


def test_ports_is_the_union_of_its_ranges(space):
    multi = space.ports("dport", [22, (80, 81), 443])
    assert multi == space.eq("dport", 22) | space.range("dport", 80, 81) | space.eq("dport", 443)
    assert multi.count() * 2**16 == 4 * space.universe().count()


def test_where_builds_the_same_set_as_its_parts(space):
    built = space.where(proto=6, dst="10.96.0.0/12", dport=(30000, 32767), iif="eth0", mark=7)
    parts = (space.eq("proto", 6) & space.prefix("dst", "10.96.0.0/12")
             & space.range("dport", 30000, 32767) & space.iface("iif", "eth0") & space.eq("mark", 7))
    assert built == parts


def test_where_with_two_families_is_empty(space):
    assert space.where(src="10.0.0.1", dst="2001:db8::1").is_empty()


# ---- interfaces -------------------------------------------------------------------------------------

def test_wildcard_interface_covers_named_and_unnamed_interfaces_with_its_prefix():
    space = PacketSpace(interfaces=["eth0", "eth1", "wlan0", "eth+"])
    eth = space.iface("iif", "eth+")
    assert flow(iif="eth0") in eth and flow(iif="eth1") in eth
    assert flow(iif="eth9") in eth          # never named anywhere: the reserved id of eth+
    assert flow(iif="eth") in eth           # the kernel compares the prefix only
    assert flow(iif="wlan0") not in eth
    assert flow(iif="docker0") not in eth
    assert flow(iif=None) not in eth        # no input interface (locally generated)
    assert space.iface("iif", "eth0") <= eth


def test_negated_interface_keeps_unnamed_interfaces_and_no_interface():
    space = PacketSpace(interfaces=["eth0"])
    not_eth0 = ~space.iface("oif", "eth0")
    assert flow(oif="lo") in not_eth0
    assert flow(oif=None) in not_eth0
    assert flow(oif="eth0") not in not_eth0


def test_nested_wildcards_stay_inside_the_shorter_one():
    space = PacketSpace(interfaces=["veth+", "vethab+", "vethabc1", "vx0"])
    short, long = space.iface("iif", "veth+"), space.iface("iif", "vethab+")
    assert long <= short and not short <= long
    assert flow(iif="vethabzz") in long and flow(iif="vethabzz") in short
    assert flow(iif="vethzz") in short and flow(iif="vethzz") not in long
    assert flow(iif="vethabc1") in long
    assert flow(iif="vx0") not in short


def test_plus_alone_matches_any_interface_but_not_none(space):
    anyif = space.iface("iif", "+")
    assert flow(iif="whatever0") in anyif
    assert flow(iif=None) not in anyif
    assert anyif == ~space.eq("iif", IFACE_NONE)


def test_interface_named_after_its_wildcard_was_used_is_refused():
    space = PacketSpace()
    space.iface("iif", "eth+")
    with pytest.raises(IfaceOrderError):
        space.iface("iif", "eth3")
    with pytest.raises(IfaceOrderError):
        space.iface("iif", "eth3+")
    space.iface("iif", "wlan0")             # other prefixes are fine
    space.iface("iif", "e+")                # and shorter wildcards (they cover eth+'s id)
    assert flow(iif="eth3") in space.iface("iif", "e+")


def test_witness_interface_name_maps_back_to_the_same_class():
    space = PacketSpace(interfaces=["eth0", "eth+"])
    others = space.iface("iif", "eth+") - space.iface("iif", "eth0")
    witness = others.pick_flow()
    assert witness.iif.startswith("eth") and witness.iif != "eth0"
    assert witness in others
    nowhere = ~space.iface("iif", "eth+") - space.eq("iif", IFACE_NONE)
    w2 = nowhere.pick_flow()
    assert w2.iif is not None and not w2.iif.startswith("eth") and w2 in nowhere
    assert space.resolve_iface("totally-unknown") == IFACE_OTHER


# ---- marks -----------------------------------------------------------------------------------------

def test_masked_mark_match_tests_only_mask_bits(space):
    masq = space.masked("mark", 0x4000, 0x4000)
    for mark, hit in [(0x4000, True), (0x4001, True), (0xC000, True), (0, False), (0x8000, False)]:
        assert (flow(mark=mark) in masq) == hit, hex(mark)
    assert space.masked("mark", 0x1, 0x1) == space.masked("mark", 1, 1)
    assert space.masked("mark", 0x3, 0x1).is_empty()  # value bits outside the mask never match


def test_masked_assign_is_the_kernel_formula_on_random_values(space):
    rng = random.Random(1)
    base = space.eq("dport", 80)
    for _ in range(60):
        old, value, mask = (rng.getrandbits(32) for _ in range(3))
        if rng.random() < 0.3:
            mask = rng.choice([0, 0xFFFFFFFF, value, 0x4000])
        image = (space.eq("mark", old) & base).masked_assign("mark", value, mask)
        assert image == space.eq("mark", (old & ~mask) ^ value) & base, (old, value, mask)


def test_masked_assign_maps_every_member(space):
    olds = [0, 1, 0x4000, 0xFFFF0000, 0x12345678]
    s = space.union(space.eq("mark", o) for o in olds)
    value, mask = 0x4000, 0x4000  # "or 0x4000"
    assert s.masked_assign("mark", value, mask) == space.union(
        space.eq("mark", (o & ~mask) ^ value) for o in olds)
    xor = s.masked_assign("mark", 0xFF, 0)
    assert xor == space.union(space.eq("mark", o ^ 0xFF) for o in olds)


def test_copy_masked_is_the_kernel_formula_on_random_values(space):
    rng = random.Random(2)
    for _ in range(40):
        mark, connmark, mask, src_mask = (rng.getrandbits(32) for _ in range(4))
        if rng.random() < 0.5:
            src_mask = mask
        s = space.eq("mark", mark) & space.eq("connmark", connmark)
        image = s.copy_masked("mark", "connmark", mask, src_mask)
        expect = (connmark & ~mask) ^ (mark & src_mask)
        assert image == space.eq("mark", mark) & space.eq("connmark", expect)


def test_copy_field_ties_destination_to_source(space):
    s = space.range("mark", 1, 3)
    copied = s.copy_field("mark", "connmark")
    assert copied == space.union(space.eq("mark", v) & space.eq("connmark", v) for v in (1, 2, 3))


def test_copy_between_address_fields_respects_families(space):
    s = space.eq("src", "10.0.0.1") | space.eq("src", "2001:db8::1")
    copied = s.copy_field("src", "dst")
    assert copied == (space.eq("src", "10.0.0.1") & space.eq("dst", "10.0.0.1")) | (
        space.eq("src", "2001:db8::1") & space.eq("dst", "2001:db8::1"))


# ---- rewrites and quantification -------------------------------------------------------------------

def test_assign_is_the_image_of_a_destination_rewrite(space):
    svc = space.where(proto=6, dst="10.96.0.1", dport=443)
    backend = svc.assign("dst", "10.244.1.5").assign("dport", 8443)
    assert backend == space.where(proto=6, dst="10.244.1.5", dport=8443)


def test_assign_keeps_other_fields_and_drops_other_family(space):
    s = space.where(src="10.0.0.0/8", dport=80) | space.where(src="2001:db8::/32", dport=80)
    out = s.assign("dst", "192.168.0.1")
    assert out == space.where(src="10.0.0.0/8", dport=80, dst="192.168.0.1")


def test_assign_range_and_rewrite(space):
    s = space.where(proto=17, sport=5000)
    masq = s.assign_range("sport", 32768, 32769)
    assert masq == space.where(proto=17, sport=(32768, 32769))
    assert s.rewrite("sport", 32768, 32769) == masq
    assert s.rewrite("sport", 1) == space.where(proto=17, sport=1)
    snat = space.where(src="10.244.0.7").rewrite("src", "192.0.2.1", "192.0.2.2")
    assert snat == space.range("src", "192.0.2.1", "192.0.2.2")


def test_exists_forgets_a_field(space):
    s = space.where(proto=6, dst="10.96.0.1", dport=443)
    assert s.exists("dst") == space.where(proto=6, dport=443) & space.family(4)
    # forgetting the family keeps addresses as 128-bit values: IPv4 ones have zero high bits
    assert s.exists(["dst", "dport", "proto", "family"]) == space.family(4) | space.prefix("src", "::/96")
    assert s.exists(["dst", "dport", "proto", "family", "src"]).is_full()
    assert s.project(["dport"]) == space.eq("dport", 443)


def test_restrict_is_the_cofactor(space):
    s = space.where(dst="10.0.0.1", dport=80) | space.where(dst="10.0.0.2", dport=81)
    assert s.restrict("dst", "10.0.0.2") == space.eq("dport", 81) & space.family(4)
    assert s.restrict("dst", "10.0.0.3").is_empty()
    assert s.restrict("dport", 80) == space.eq("dst", "10.0.0.1")


def test_fields_constrained_names_what_decides_membership(space):
    s = space.where(proto=6, dst="10.96.0.1", dport=443)
    assert s.fields_constrained() == ("family", "proto", "dst", "dport")
    assert space.universe().fields_constrained() == ()
    assert space.any_flag("ctstate", "ESTABLISHED").fields_constrained() == ("ctstate",)


# ---- conntrack state and TCP flags -------------------------------------------------------------------

def test_a_packet_has_exactly_one_conntrack_state(space):
    new, est = CTSTATE_BITS["NEW"], CTSTATE_BITS["ESTABLISHED"]
    assert space.eq("ctstate", 0).is_empty()
    assert space.eq("ctstate", new | est).is_empty()
    assert not space.eq("ctstate", new | CTSTATE_BITS["DNAT"]).is_empty()
    assert space.ctstate_one_hot().is_full()
    states = space.union(space.any_flag("ctstate", s) for s in
                         ["NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED"])
    assert states.is_full()
    assert space.any_flag("ctstate", "NEW").isdisjoint(space.any_flag("ctstate", "ESTABLISHED"))


def test_ctstate_list_matches_any_listed_state(space):
    s = space.any_flag("ctstate", "NEW,ESTABLISHED")
    assert flow(ctstate={"ESTABLISHED"}) in s and flow(ctstate={"NEW", "DNAT"}) in s
    assert flow(ctstate={"RELATED"}) not in s


def test_tcp_flags_mask_compare(space):
    syn_only = space.masked("tcp_flags", space.flag_value("tcp_flags", "SYN"),
                            space.flag_value("tcp_flags", "SYN,RST,ACK,FIN"))
    assert flow(tcp_flags={"SYN"}) in syn_only
    assert flow(tcp_flags={"SYN", "PSH"}) in syn_only
    assert flow(tcp_flags={"SYN", "ACK"}) not in syn_only
    assert TCP_FLAG_BITS["ACK"] == 0x10


# ---- algebra, witnesses, counting ----------------------------------------------------------------------

def test_complement_is_within_the_universe(space):
    s = space.where(proto=6, dst="10.0.0.0/8")
    assert (s & ~s).is_empty()
    assert (s | ~s).is_full()
    assert ~~s == s
    assert (~space.universe()).is_empty()
    assert flow("2001:db8::1", "2001:db8::2") in ~space.prefix("dst", "10.0.0.0/8")
    assert s - s == space.empty() and (s ^ s).is_empty() and (s ^ ~s).is_full()


def test_truth_value_is_refused(space):
    with pytest.raises(TypeError):
        bool(space.universe())
    with pytest.raises(TypeError):
        if space.empty():
            pass


def test_sets_of_different_spaces_do_not_mix(space):
    with pytest.raises(ValueError):
        space.universe() & PacketSpace(backend=space.backend).universe()


def test_pick_gives_a_member_with_low_values(space):
    cases = [
        space.where(proto=6, dst="10.96.0.0/12", dport=(30000, 32767)),
        space.where(src="2001:db8::/64", proto=58),
        space.masked("mark", 0x4000, 0x4000) & space.any_flag("ctstate", "ESTABLISHED,RELATED"),
        space.where(proto=17) - space.eq("sport", 32768),
        ~space.where(proto=6),
    ]
    for s in cases:
        values = s.pick()
        assert s.space.to_flow(values) in s
        assert s.pick_flow() in s
    w = cases[0].pick()
    assert (w["dst"], w["dport"], w["proto"]) == (int(ipaddress.ip_address("10.96.0.0")), 30000, 6)
    assert cases[0].pick_flow().dst == ipaddress.ip_address("10.96.0.0")
    assert space.empty().pick() is None and space.empty().pick_flow() is None


def test_pick_without_preferences_is_the_lowest_member(space):
    assert space.universe().pick(prefer={}) == dict.fromkeys(space.fields, 0) | {"ctstate": 1}


def test_pick_prefers_sets_in_order_when_given_sets(space):
    s = space.where(proto=(6, 17), dport=(1, 1000))
    w = s.pick(prefer=[space.eq("proto", 17), space.eq("dport", 53), space.eq("dport", 80)])
    assert (w["proto"], w["dport"]) == (17, 53)
    space.preferences = ()
    assert space.universe().pick()["proto"] == 0
    space.preferences = [space.eq("dport", 8080)]
    assert space.universe().pick()["dport"] == 8080
    assert space.preferences == (space.eq("dport", 8080),)


def test_pick_steers_towards_preferred_values_where_the_set_allows(space):
    w = space.universe().pick()
    assert (w["proto"], w["sport"]) == (6, 32768)
    assert space.where(proto=17, sport=(1000, 2000)).pick()["sport"] == 1000
    assert space.where(proto=17).pick()["proto"] == 17
    assert space.universe().pick(prefer={"dport": 443, "proto": 17})["dport"] == 443


def test_flow_round_trips_through_a_one_packet_set(space):
    space.declare_interfaces(["eth0"])
    f = Flow("10.1.2.3", "10.96.0.10", proto=17, sport=40000, dport=53, iif="eth0",
             ctstate={"ESTABLISHED", "DNAT"}, mark=0x4000, tcp_flags={"ACK"}, uid=1000)
    one = space.from_flow(f)
    assert one.count() == 1
    assert one.pick_flow() == f
    assert f in one and Flow("10.1.2.3", "10.96.0.10", proto=17) not in one
    v6 = Flow("2001:db8::1", "2001:db8::2", proto=6, sport=1, dport=2)
    assert space.from_flow(v6).pick_flow() == v6


def test_count_is_exact(space):
    total = space.universe().count()
    assert space.eq("dport", 80).count() * 65536 == total
    assert space.family(4).count() + space.family(6).count() == total
    # one IPv4 packet per address, whatever the free high bits
    assert space.prefix("dst", "10.0.0.0/24").count() * 2**32 == 256 * space.family(4).count()
    assert space.prefix("dst", "10.0.0.0/24").exists("family") == space.range(
        "dst", 0x0A000000, 0x0A0000FF) & (space.family(4) | space.prefix("src", "::/96"))


def test_other_variable_orders_give_the_same_sets():
    spaces = PacketSpace(layout=tuple(reversed(LAYOUT))), PacketSpace()
    results = []
    for sp in spaces:
        s = sp.where(proto=6, dst="10.96.0.0/12", dport=(80, 90)).masked_assign("mark", 0x4000, 0x4000)
        w = s.pick_flow()
        assert w in s
        results.append((s.count(), w))
    assert results[0] == results[1]
    with pytest.raises(ValueError):
        PacketSpace(layout=LAYOUT[:-1])


# ---- Flow -------------------------------------------------------------------------------------------

def test_flow_renders_like_an_operator_writes_it():
    assert str(Flow("10.0.0.1", "10.0.0.2", sport=1234, dport=80)) == "tcp 10.0.0.1:1234 -> 10.0.0.2:80"
    assert str(Flow("::1", "::2", proto=17, sport=5, dport=53)) == "udp [::1]:5 -> [::2]:53"
    assert str(Flow("10.0.0.1", "10.0.0.2", proto=1, icmp_type=8)) == \
        "icmp 10.0.0.1 -> 10.0.0.2 type 8 code 0"
    assert str(Flow("10.0.0.1", "10.0.0.2", proto=47, mark=0x4000, ctstate="ESTABLISHED")) == \
        "gre 10.0.0.1 -> 10.0.0.2 ctstate ESTABLISHED mark 0x4000"


def test_flow_refuses_mixed_families_and_impossible_states():
    with pytest.raises(ValueError):
        Flow("10.0.0.1", "::1")
    with pytest.raises(ValueError):
        Flow("10.0.0.1", "10.0.0.2", ctstate={"NEW", "ESTABLISHED"})
    with pytest.raises(ValueError):
        Flow("10.0.0.1", "10.0.0.2", family=6)
    assert Flow("10.0.0.1", "10.0.0.2").family == 4
