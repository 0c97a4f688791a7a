"""Netfilter layer: the kernel's order of stages, per hook and per iptables backend, in one place.

Each hook runs the stages registered on it in ascending priority. The tables are iptables'
(raw, mangle, nat, filter, security); CONNTRACK is the conntrack lookup (``nf_conntrack_in``,
priority -200) after which the nat table only sees a connection's first packet.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stage:
    """One hook function: an iptables table (``table`` set) or the conntrack lookup."""

    name: str       # raw, conntrack, mangle, nat, filter, security
    priority: int   # NF_IP_PRI_* (the hook's order: lower runs first)

    @property
    def table(self) -> str | None:
        return None if self.name == "conntrack" else self.name


# NF_IP_PRI_* from include/uapi/linux/netfilter_ipv4.h (ip6tables uses the same numbers)
RAW = Stage("raw", -300)
CONNTRACK = Stage("conntrack", -200)
MANGLE = Stage("mangle", -150)
NAT_DST = Stage("nat", -100)          # DNAT: PREROUTING and OUTPUT
FILTER = Stage("filter", 0)
SECURITY = Stage("security", 50)      # x_tables (iptables-legacy): NF_IP_PRI_SECURITY
NAT_SRC = Stage("nat", 100)           # SNAT: POSTROUTING and INPUT
# iptables-nft registers the security table's base chains at priority 150, not 50 (iptables
# nft.c; `nft list table ip security` shows "priority 150"), so there security INPUT runs after
# nat INPUT (checked on 6.x: tests/kernel/test_explain_kernel.py, case security-after-nat-input)
SECURITY_NFT = Stage("security", 150)

HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")

#: iptables-legacy (x_tables): what each hook runs, in priority order
LEGACY = {
    "PREROUTING": (RAW, CONNTRACK, MANGLE, NAT_DST),
    "INPUT": (MANGLE, FILTER, SECURITY, NAT_SRC),
    "FORWARD": (MANGLE, FILTER, SECURITY),
    "OUTPUT": (RAW, CONNTRACK, MANGLE, NAT_DST, FILTER, SECURITY),
    "POSTROUTING": (MANGLE, NAT_SRC),
}

#: iptables-nft: the same tables, security after nat INPUT
NFT = {
    "PREROUTING": (RAW, CONNTRACK, MANGLE, NAT_DST),
    "INPUT": (MANGLE, FILTER, NAT_SRC, SECURITY_NFT),
    "FORWARD": (MANGLE, FILTER, SECURITY_NFT),
    "OUTPUT": (RAW, CONNTRACK, MANGLE, NAT_DST, FILTER, SECURITY_NFT),
    "POSTROUTING": (MANGLE, NAT_SRC),
}

BACKENDS = {"nft": NFT, "legacy": LEGACY}
#: a dump that does not say which backend wrote it is read as iptables-nft, the default of
#: every current distribution (iptables >= 1.8 with the nf_tables backend)
DEFAULT_BACKEND = "nft"


def stages(hook: str, backend: str | None = None) -> tuple[Stage, ...]:
    """The stages ``hook`` runs, in the kernel's order, for ``backend`` (None: the default).

    >>> [s.name for s in stages("INPUT", "legacy")]
    ['mangle', 'filter', 'security', 'nat']
    >>> [s.name for s in stages("INPUT", "nft")]
    ['mangle', 'filter', 'nat', 'security']
    >>> all(list(t) == sorted(t, key=lambda s: s.priority) for b in BACKENDS.values() for t in b.values())
    True
    """
    return BACKENDS[backend or DEFAULT_BACKEND][hook]


@functools.lru_cache(maxsize=None)
def tables(hook: str, backend: str | None = None) -> tuple[str, ...]:
    """The iptables tables ``hook`` runs, in order.

    >>> tables("OUTPUT")
    ('raw', 'mangle', 'nat', 'filter', 'security')
    """
    return tuple(s.name for s in stages(hook, backend) if s.table)


def order_differs(hook: str, present: set) -> bool:
    """Whether the backends run the tables in ``present`` at ``hook`` in different orders (then an
    unknown backend is an assumption worth stating).

    >>> order_differs("INPUT", {"nat", "security"}), order_differs("INPUT", {"filter", "nat"})
    (True, False)
    """
    return _order_differs(hook, frozenset(present))


@functools.lru_cache(maxsize=4096)
def _order_differs(hook: str, present: frozenset) -> bool:
    seqs = {tuple(t for t in tables(hook, b) if t in present) for b in BACKENDS}
    return len(seqs) > 1
