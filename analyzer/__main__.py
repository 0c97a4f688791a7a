"""``python -m analyzer``: the synack command line."""
import sys

from analyzer.cli import main

sys.exit(main())
