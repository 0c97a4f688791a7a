"""Netfilter layer: what the kernel evaluates, in which order (hooks, routing, conntrack, NAT)."""
