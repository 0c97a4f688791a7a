"""Names of the packet fields shared by the engine's modules, importable without dd (a concrete
walk imports `analyzer.engine.concolic`, which must not load the BDD library)."""

#: the address fields of a packet (and of a packet set's layout)
ADDRESS_FIELDS = ("src", "dst")
