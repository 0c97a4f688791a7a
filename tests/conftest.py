"""Shared pytest options: ``--update-goldens`` rewrites the expected outputs under samples/."""


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite golden files under samples/ from the current output (review the diff)")


# Property tests run the same examples on every run (CI and here): a randomised run of the
# open-flow property test once met a generated ruleset whose exploration grew past 7 GB and did
# not finish; `SYNACK_HYPOTHESIS_RANDOM=1` explores new examples when hunting such cases.
try:
    import os

    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("synack", derandomize=not os.environ.get("SYNACK_HYPOTHESIS_RANDOM"))
    _hypothesis_settings.load_profile("synack")
except ImportError:  # hypothesis is in the test extra; tests that need it import it themselves
    pass
