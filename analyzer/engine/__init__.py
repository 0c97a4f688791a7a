"""Symbolic engine: packet sets as BDDs and the traces a walk produces; knows no iptables names."""
from .packetset import (
    ADDRESS_FIELDS, CT_STATES, CTSTATE_BITS, IFACE_NONE, IFACE_OTHER, LAYOUT, TCP_FLAG_BITS,
    Flow, IfaceOrderError, PacketSet, PacketSpace,
)
from .trace import APPROXIMATE, EXACT, chance

__all__ = [
    "ADDRESS_FIELDS", "CT_STATES", "CTSTATE_BITS", "IFACE_NONE", "IFACE_OTHER", "LAYOUT",
    "TCP_FLAG_BITS", "Flow", "IfaceOrderError", "PacketSet", "PacketSpace",
    "APPROXIMATE", "EXACT", "chance",
]
