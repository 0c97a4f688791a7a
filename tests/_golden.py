"""Helpers shared by the golden-sample tests: run the CLI in-process from the repository root,
compare with (or, under ``--update-goldens``, rewrite) the expected output next to a sample."""
from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from analyzer.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)  # paths in the output are relative to the repository
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(argv)
    finally:
        os.chdir(cwd)
    return rc, out.getvalue(), err.getvalue()


def check_golden(request, path: Path, text: str):
    if request.config.getoption("--update-goldens") or not path.exists():
        path.write_text(text)
        if not request.config.getoption("--update-goldens"):
            pytest.fail(f"{path.name} did not exist; written, review it")
        return
    assert text == path.read_text(), \
        f"output differs from {path.relative_to(ROOT)} (run pytest --update-goldens and review)"
