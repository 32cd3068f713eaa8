"""scripts/bootstrap.sh (what `make` runs first) on a machine without network whose Python already
lives in a virtual environment holding everything lorafuse needs: the lent GPU image's case."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", ".benchmarks", "demo_out", "runs")


@pytest.mark.slow
def test_setup_inside_a_full_environment_sees_its_packages_and_installs_offline(tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the suite to run from a virtual environment (make test does)")
    tree = tmp_path / "tree"  # a copy: the editable install writes its metadata into the tree
    shutil.copytree(ROOT, tree, ignore=NOT_SOURCE)
    venv = tmp_path / "venv"
    # PIP_NO_INDEX: any attempt to fetch a package fails, so passing proves nothing was fetched.
    env = dict(os.environ, PYTHON=sys.executable, VENV=str(venv), PIP_NO_INDEX="1")
    proc = subprocess.run(["bash", str(tree / "scripts" / "bootstrap.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"also sees the packages of {sys.prefix}" in proc.stdout
    assert "installing lorafuse alone, offline" in proc.stdout, proc.stdout
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import torch, lorafuse.engine.cli, lorafuse.kernels; print(torch.__file__); "
                            "print(lorafuse.__file__)"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert check.returncode == 0, check.stderr[-3000:]
    torch_file, lorafuse_file = check.stdout.split()
    assert torch_file == torch.__file__  # the outer environment's torch, not a second copy
    assert Path(lorafuse_file).is_relative_to(tree)  # the copy, installed in editable mode


def test_missing_requirements_are_listed_with_what_was_found(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=1"]\n'
        '[project]\nname = "x"\nversion = "0"\n'
        'dependencies = ["torch>=1.0", "torch<2.0", "no-such-package-here>=1", "pip; sys_platform == \'x\'"]\n'
        '[project.optional-dependencies]\ndev = ["ruff>=0.1", "pytest>=1"]\n')
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "missing_requirements.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout.split("\n")[:2] == [f"torch<2.0 (found {torch.__version__})", "no-such-package-here"]
    assert "ruff" not in proc.stdout and "pip" not in proc.stdout  # ruff is optional; the marker is false
