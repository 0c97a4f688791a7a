"""Symbolic engine: packet sets as BDDs and the traces a walk produces; knows no iptables names.

The BDD names are loaded on first use (PEP 562): importing ``analyzer.engine.trace`` or
``analyzer.engine.concolic`` for a concrete walk does not import dd (and, through dd, networkx:
~0.35 s of a one-flow ``synack explain``)."""
from .trace import APPROXIMATE, EXACT, chance

_PACKETSET = ("ADDRESS_FIELDS", "CT_STATES", "CTSTATE_BITS", "IFACE_NONE", "IFACE_OTHER", "LAYOUT",
              "TCP_FLAG_BITS", "Flow", "IfaceOrderError", "PacketSet", "PacketSpace")

__all__ = [*_PACKETSET, "APPROXIMATE", "EXACT", "chance"]


def __getattr__(name):
    if name in _PACKETSET:
        from . import packetset
        return getattr(packetset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
