"""Model layer: frozen, typed, located data every later stage reads."""
from analyzer.model import rules as _rules
from analyzer.model.rules import *  # noqa: F401,F403

__all__ = [n for n in vars(_rules) if not n.startswith("_") and n[0].isupper()]
