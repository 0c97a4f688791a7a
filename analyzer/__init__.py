"""synack: follow a flow through iptables/NAT (and Cilium) forward and back."""

__version__ = "0.1.0"
