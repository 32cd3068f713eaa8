"""pyproject.toml's packaging: lorafuse installed from a wheel (not in editable mode) carries the offload
extension's sources (csrc/, as the data-only package lorafuse.csrc) and builds the extension from them
on first use, exactly as an editable install builds it from the repository's csrc/."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from lorafuse.engine import extension as ext

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from: pyproject.toml, its readme and the directories of its package-dir.
WHEEL_SOURCES = ["pyproject.toml", "README.md", "lorafuse", "engine", "kernels", "csrc"]
# Run in the installed environment from outside the repository: where lorafuse and the sources are.
WHERE = ("import json, lorafuse\n"
         "from lorafuse.engine import extension as ext\n"
         "root = ext._source_root()\n"
         "key = ext._build_key(root) if root else None\n"
         "print(json.dumps({'lorafuse': lorafuse.__file__, 'root': str(root), 'key': key}))\n")
LOAD = ("from lorafuse.engine import extension as ext\n"
        "assert ext.load_extension(), ext.extension_status()\n"
        "print(ext.extension_status())\n")


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment holding lorafuse from a wheel of this tree (built and installed
    offline), seeing the test's environment for torch and the rest; returns (its python, an env)."""
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"  # a copy: building writes build/ and lorafuse.egg-info into the tree
    tree.mkdir()
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, tree / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist"), str(tree)], timeout=600)
    (wheel,) = (tmp / "dist").glob("lorafuse-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], timeout=300)
    python = venv / "bin" / "python"
    # From inside another virtual environment, --system-site-packages reaches only the base interpreter:
    # a .pth file adds this one's site directories (as scripts/bootstrap.sh does), after the new one's own.
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        timeout=120).strip())
    (purelib / "_outer_env.pth").write_text("".join(f"import site; site.addsitedir({path!r})\n"
                                                    for path in site.getsitepackages()))
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         timeout=600)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    unset = ("LORAFUSE_SOURCE_DIR", "LORAFUSE_EXTENSION", "PYTHONPATH")  # the package's own sources, built
    env = {key: value for key, value in os.environ.items() if key not in unset}
    env.update(PYTHONSAFEPATH="1", LORAFUSE_CACHE=str(tmp / "cache"))
    return python, {"cwd": elsewhere, "env": env}


def test_wheel_install_finds_the_extension_sources_inside_the_package(installed):
    python, where = installed
    found = json.loads(_run([str(python), "-c", WHERE], timeout=300, **where))
    package = Path(found["lorafuse"]).parent
    assert package.is_relative_to(python.parent.parent) and not package.is_relative_to(ROOT), found
    root = Path(found["root"])
    assert root == package / "csrc", found
    shipped = {path.name: path.read_bytes() for path in root.iterdir() if path.is_file()}
    sources = {path.name: path.read_bytes() for path in (ROOT / "csrc").iterdir() if path.is_file()}
    assert shipped == sources and "CMakeLists.txt" in shipped
    # The same files, so the same build as from the repository's csrc/ (a cache entry serves both).
    assert found["key"] == ext._build_key(ROOT / "csrc")


@pytest.mark.slow
def test_wheel_install_builds_and_loads_the_extension_on_first_use(installed):
    python, where = installed
    status = _run([str(python), "-c", LOAD], timeout=1200, **where).strip()
    library = Path(status.split("extension loaded from ")[1].split(" (")[0])
    assert library.is_file() and library.is_relative_to(Path(where["env"]["LORAFUSE_CACHE"])), status
    assert library.parent.name == ext._build_key(ROOT / "csrc"), status
