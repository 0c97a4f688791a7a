"""The wheel carries the grammar: build it, install it into a fresh venv, run synack from there."""
from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dependency_dirs() -> list[str]:
    """The site-packages directories of the running interpreter, after any of synack's own
    entries: a .pth line adds a directory without running its .pth files, so an editable install
    of synack there does not shadow the wheel."""
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


@pytest.mark.slow
def test_wheel_ships_grammar_and_runs_from_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    wheel = next(dist.glob("synack-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "analyzer/grammar/iptables.lark" in names
    env_dir = tmp_path / "venv"
    # the dependencies (lark, networkx, dd, PyYAML) come from the environment running the tests,
    # whether that is the system Python or a virtual environment (whose packages a venv's
    # system_site_packages would not see); synack itself comes only from the wheel, and the run
    # happens outside the source tree
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True)
    Path(r.stdout.strip(), "_synack_test_deps.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sample = ROOT / "samples" / "seed1-hairpin-host.rules"
    r = subprocess.run([str(env_dir / "bin" / "synack"), "parse", str(sample)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nat (5 chains, 2 rules)" in r.stdout
    r = subprocess.run([str(py), "-c", "import analyzer, sys; print(analyzer.__file__)"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert str(env_dir) in r.stdout
