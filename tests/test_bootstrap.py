"""scripts/bootstrap.sh (what `make` runs first) on a machine without network whose Python already
lives in a virtual environment holding everything lorafuse needs: the lent GPU image's case."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_setup_inside_a_full_environment_sees_its_packages_and_installs_offline(tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the suite to run from a virtual environment (make test does)")
    venv = tmp_path / "venv"
    # PIP_NO_INDEX: any attempt to fetch a package fails, so passing proves nothing was fetched.
    env = dict(os.environ, PYTHON=sys.executable, VENV=str(venv), PIP_NO_INDEX="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"also sees the packages of {sys.prefix}" in proc.stdout
    assert "installing lorafuse alone, offline" in proc.stdout
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import torch, lorafuse.engine.cli, lorafuse.kernels; print(torch.__file__)"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.strip() == torch.__file__  # the outer environment's torch, not a second copy
