"""Netfilter layer: which address and port the kernel's NAT picks for a new connection.

A transcription of ``get_unique_tuple`` and ``find_best_ips_proto`` in net/netfilter/nf_nat_core.c
(checked against torvalds/linux at 002c6ca7 and against the 6.x kernel the kernel tests run on).
It assumes the new tuple is free (no other connection uses it), which is what one flow asks.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

M32 = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & M32


def jhash2(words: list[int], initval: int) -> int:
    """Bob Jenkins' lookup3 over 32-bit words, as include/linux/jhash.h's ``jhash2``.

    >>> hex(jhash2([0, 0, 0, 0], 0))
    '0xbaf9078c'
    """
    a = b = c = (0xDEADBEEF + (len(words) << 2) + initval) & M32
    k = list(words)
    while len(k) > 3:
        a, b, c = (a + k[0]) & M32, (b + k[1]) & M32, (c + k[2]) & M32
        # __jhash_mix
        a = (a - c) & M32; a ^= _rol(c, 4); c = (c + b) & M32
        b = (b - a) & M32; b ^= _rol(a, 6); a = (a + c) & M32
        c = (c - b) & M32; c ^= _rol(b, 8); b = (b + a) & M32
        a = (a - c) & M32; a ^= _rol(c, 16); c = (c + b) & M32
        b = (b - a) & M32; b ^= _rol(a, 19); a = (a + c) & M32
        c = (c - b) & M32; c ^= _rol(b, 4); b = (b + a) & M32
        k = k[3:]
    if not k:
        return c
    if len(k) == 3:
        c = (c + k[2]) & M32
    if len(k) >= 2:
        b = (b + k[1]) & M32
    a = (a + k[0]) & M32
    # __jhash_final
    c ^= b; c = (c - _rol(b, 14)) & M32
    a ^= c; a = (a - _rol(c, 11)) & M32
    b ^= a; b = (b - _rol(a, 25)) & M32
    c ^= b; c = (c - _rol(b, 16)) & M32
    a ^= c; a = (a - _rol(c, 4)) & M32
    b ^= a; b = (b - _rol(a, 14)) & M32
    c ^= b; c = (c - _rol(b, 24)) & M32
    return c


def _words(addr) -> list[int]:
    """The address as ``union nf_inet_addr``'s four u32, loaded on a little-endian CPU (x86,
    arm64): an IPv4 address fills the first word, the rest are zero (the tuple is memset)."""
    b = addr.packed.ljust(16, b"\0")
    return [int.from_bytes(b[i:i + 4], "little") for i in range(0, 16, 4)]


def _host(word: int) -> int:  # ntohl on a little-endian CPU
    return int.from_bytes(word.to_bytes(4, "little"), "big")


def pick_address(lo, hi, src, dst, persistent: bool = False, dnat: bool = True, zone: int = 0):
    """The address ``find_best_ips_proto`` picks in ``lo``-``hi`` for a connection ``src`` ->
    ``dst`` (the tuple before this translation). Deterministic: a jhash2 of the source address
    seeded with the destination's last word (0 with ``--persistent``), no per-boot secret
    ("servers see the same client coming from the same IP ... even across reboots"). The result
    depends on the CPU's byte order; this is little-endian.

    >>> a = ipaddress.ip_address
    >>> pick_address(a("10.0.2.10"), a("10.0.2.10"), a("10.0.1.2"), a("10.99.0.1"))
    IPv4Address('10.0.2.10')
    >>> lo, hi = a("10.0.2.10"), a("10.0.2.20")
    >>> lo <= pick_address(lo, hi, a("10.0.1.2"), a("10.99.0.1")) <= hi
    True
    """
    if lo == hi:
        return lo
    mx = 0 if lo.version == 4 else 3
    src_w, dst_w = _words(src), _words(dst)
    lo_w, hi_w = _words(lo), _words(hi)
    j = jhash2(src_w, 0 if persistent else (dst_w[mx] ^ zone))
    out = list(dst_w if dnat else src_w)
    full = False
    for i in range(mx + 1):
        if not full:
            minip, maxip = _host(lo_w[i]), _host(hi_w[i])
            dist = (maxip - minip + 1) & M32
        else:
            minip, dist = 0, M32
        v = (minip + ((j * dist) >> 32)) & M32   # reciprocal_scale(j, dist)
        out[i] = int.from_bytes(v.to_bytes(4, "big"), "little")  # htonl, stored
        if out[i] != hi_w[i]:
            full = True
        if not persistent:
            # tuple->dst: for DNAT that is the word just written
            j ^= out[i] if dnat else dst_w[i]
    packed = b"".join(w.to_bytes(4, "little") for w in out)
    return ipaddress.ip_address(packed[:4] if lo.version == 4 else packed)


@dataclass(frozen=True, slots=True)
class PortChoice:
    port: int | None
    exact: bool
    why: str | None = None  # when not exact: what the kernel does instead


def pick_port(port: int | None, lo: int | None, hi: int | None, random: bool = False,
              dnat: bool = False) -> PortChoice:
    """The port step 3 of ``get_unique_tuple`` leaves (or ``nf_nat_l4proto_unique_tuple`` picks)
    for a connection whose translated tuple is free.

    >>> pick_port(41000, 1024, 65535)            # MASQUERADE --to-ports 1024-65535
    PortChoice(port=41000, exact=True, why=None)
    >>> pick_port(41000, 20000, 30000).exact     # outside: a random offset into the range
    False
    >>> pick_port(80, 8080, 8080)                # a single port
    PortChoice(port=8080, exact=True, why=None)
    >>> pick_port(80, None, None, dnat=True)     # DNAT without ports never changes the port
    PortChoice(port=80, exact=True, why=None)
    """
    if port is None:
        return PortChoice(None, True)
    if lo is None:
        if dnat or not random:
            return PortChoice(port, True)
        base = (1, 511) if port < 512 else (600, 1023) if port < 1024 else (1024, 65535)
        return PortChoice(port, False, f"--random: the kernel picks a random port in {base[0]}-{base[1]}")
    if not random and lo <= port <= hi:
        return PortChoice(port, True)
    if lo == hi:
        return PortChoice(lo, True)
    why = ("--random: " if random else f"{port} is outside {lo}-{hi}: ") + \
        f"the kernel picks the port at a random offset into {lo}-{hi} (nf_nat_l4proto_unique_tuple)"
    if dnat and not random:
        why = (f"{port} is outside {lo}-{hi}: the 6.18 kernel takes the first free port of the range "
               "for DNAT (tests/kernel), the nf_nat_core.c read here a random offset into it")
    return PortChoice(lo, False, why)
