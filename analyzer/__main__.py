"""``python -m analyzer``: the synack command line."""
from analyzer.cli import run

run()
