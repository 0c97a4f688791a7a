"""Shared pytest options: ``--update-goldens`` rewrites the expected outputs under samples/."""


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite golden files under samples/ from the current output (review the diff)")
