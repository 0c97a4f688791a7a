"""Lark grammars of synack's inputs; shipped inside the wheel as ``analyzer.grammar``."""
