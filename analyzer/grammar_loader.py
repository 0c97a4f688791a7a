"""Source layer: reads the Lark grammars shipped as ``analyzer.grammar`` (``grammar/`` in the repo)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def grammar_text(name: str) -> str:
    try:
        return resources.files("analyzer.grammar").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # a source checkout run without installing: grammar/ sits beside analyzer/
        return (Path(__file__).resolve().parent.parent / "grammar" / name).read_text(encoding="utf-8")
