"""The offload extension (csrc/, built by csrc/CMakeLists.txt): build on first use, load once per process.

The library registers torch.classes.lorafuse.OffloadArena (activations/arena.py uses it) and
links only torch's C++ libraries (no Python C API), so one build serves every Python version.
It builds with CMake into $LORAFUSE_CACHE/ext/<key> (default ~/.cache/lorafuse/ext/<key>); the key
hashes the sources and the torch version, so `pip install -e .` stays pure Python and a changed
source or torch rebuilds once. When it cannot build (no cmake, no compiler, ...) one log line says
so and offload runs on the pure-PyTorch arena. LORAFUSE_EXTENSION=0 turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_LIB_NAME = "liblorafuse_C.so"
_BUILD_RECIPE = 1  # bump when the build procedure changes, to rebuild cached libraries
_RETRY_FAILED_BUILD_S = 600  # a failed build is not retried by other processes for this long


class ExtensionBuildError(RuntimeError):
    """The offload extension could not be built; the message names the cause and the log."""


def _source_root() -> Path | None:
    """The directory CMake builds from: $LORAFUSE_SOURCE_DIR, else the csrc/ beside lorafuse.engine.

    pyproject.toml ships csrc/ as package data (lorafuse.csrc), so it sits beside this module's
    package in every install: the repository's csrc/ in an editable one, lorafuse/csrc/ from a wheel.
    $LORAFUSE_SOURCE_DIR names such a directory, or a tree holding CMakeLists.txt and csrc/ (the
    repository's root).
    """
    candidates = [Path(os.environ["LORAFUSE_SOURCE_DIR"])] if os.environ.get("LORAFUSE_SOURCE_DIR") else []
    candidates.append(Path(__file__).resolve().parent.parent / "csrc")
    for root in candidates:
        if (root / "CMakeLists.txt").is_file() and ((root / "offload_arena.cpp").is_file()
                                                    or (root / "csrc" / "offload_arena.cpp").is_file()):
            return root
    return None


def _source_files(root: Path) -> list[Path]:
    """What a build from `root` reads: its CMakeLists.txt and the files of its csrc/ (root itself when it
    is the csrc/ directory; csrc/CMakeLists.txt is one of them)."""
    csrc = root / "csrc" if (root / "csrc").is_dir() else root
    return sorted({root / "CMakeLists.txt", *(path for path in csrc.iterdir() if path.is_file())})


def extension_cache_dir() -> Path:
    """Where built extensions live: $LORAFUSE_CACHE/ext, else $XDG_CACHE_HOME or ~/.cache, /lorafuse/ext."""
    base = os.environ.get("LORAFUSE_CACHE")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorafuse")
    return Path(base) / "ext"


def _build_key(root: Path) -> str:
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{sys.platform}|{platform.machine()}|"
                  f"{_BUILD_RECIPE}".encode())
    return digest.hexdigest()[:16]


def _find_tool(name: str) -> str | None:
    """cmake / ninja: on PATH, beside this Python (a venv's bin), or from their PyPI packages."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        module = __import__(name)
        bin_dir = getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR", None)
    except Exception:
        return None
    return shutil.which(name, path=str(bin_dir)) if bin_dir else None


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _first_error(output: str) -> str:
    """The first line of build output that names an error (with the line after a trailing colon)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "error" in line.lower():
            if line.endswith(":") and index + 1 < len(lines):
                line = f"{line} {lines[index + 1]}"
            return line[:200]
    return lines[-1][:200] if lines else "no output"


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialises builds of one key across processes (several ranks starting at once)."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_extension(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Builds (or finds in the cache) liblorafuse_C.so and returns its path; does not load it.

    Raises ExtensionBuildError with the cause; the full CMake output is kept in a log file beside
    the cache entry.
    """
    root = _source_root()
    if root is None:
        raise ExtensionBuildError("sources not found (csrc/ with its CMakeLists.txt; set LORAFUSE_SOURCE_DIR)")
    cmake = _find_tool("cmake")
    if cmake is None:
        raise ExtensionBuildError("cmake not found (pip install cmake ninja)")
    key = _build_key(root)
    cache = Path(cache_dir) if cache_dir is not None else extension_cache_dir()
    target_dir = cache / key
    library = target_dir / _LIB_NAME
    if library.is_file() and not force:
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f"{key}.lock"):
        if library.is_file() and not force:
            return library  # another process built it while this one waited
        failed = cache / f"{key}.failed"
        if not force and failed.is_file() and time.time() - failed.stat().st_mtime < _RETRY_FAILED_BUILD_S:
            # Several ranks starting together: one build attempt, not one per rank.
            raise ExtensionBuildError(failed.read_text().strip() + " (recent failure, not retried)")
        build_dir = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=cache))
        log_path = cache / f"{key}-build.log"
        configure = [cmake, "-S", str(root), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                     f"-DLORAFUSE_PYTHON={sys.executable}",
                     # the library at the top of the build directory, also when a tree's root adds csrc/
                     f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir}"]
        ninja = _find_tool("ninja")
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        nvcc = _find_nvcc() if torch.version.cuda else None
        if nvcc:
            configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        log = []
        try:
            for command in (configure, [cmake, "--build", str(build_dir), "--parallel"]):
                result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        timeout=1800)
                log.append("$ " + " ".join(command) + "\n" + result.stdout)
                if result.returncode != 0:
                    cause = _first_error(result.stdout)
                    raise ExtensionBuildError(f"{Path(command[0]).name} failed ({cause}); log: {log_path}")
            target_dir.mkdir(parents=True, exist_ok=True)
            staging = target_dir / f"{_LIB_NAME}.{os.getpid()}.tmp"
            shutil.copy2(build_dir / _LIB_NAME, staging)
            os.replace(staging, library)  # atomic: a reader sees no library or a whole one
            failed.unlink(missing_ok=True)
        except (OSError, subprocess.SubprocessError, ExtensionBuildError) as error:
            if not isinstance(error, ExtensionBuildError):
                error = ExtensionBuildError(f"build failed ({error}); log: {log_path}")
            with contextlib.suppress(OSError):
                failed.write_text(str(error))
            raise error from None
        finally:
            log_path.write_text("\n".join(log))
            shutil.rmtree(build_dir, ignore_errors=True)
    return library


_extension_lock = threading.Lock()
_extension: dict[str, Any] = {"path": None, "error": None, "warned_cpu_only": False, "disabled_said": False}


def _registered() -> bool:
    try:
        torch.classes.lorafuse.OffloadArena  # noqa: B018 - raises when the class is not registered
        return True
    except (RuntimeError, AttributeError):
        return False


def _disabled_by_env() -> bool:
    return os.environ.get("LORAFUSE_EXTENSION", "1").strip().lower() in ("0", "off", "false", "no")


def load_extension() -> bool:
    """Builds if needed and loads the extension once per process; False (and one log line) if it cannot.

    LORAFUSE_EXTENSION=0 skips it. A library that registered the classes already (loaded by
    another path) is kept: loading a second one would register the namespace twice.
    """
    with _extension_lock:
        if _extension["path"] is not None:
            return True
        if _disabled_by_env():
            # Not remembered as a failure: the setting is read again at the next call.
            if not _extension["disabled_said"]:
                _extension["disabled_said"] = True
                logger.warning("lorafuse: C++ offload extension disabled by LORAFUSE_EXTENSION; "
                               "offload uses the pure-PyTorch path")
            return False
        if _extension["error"] is not None:
            return False
        if _registered():
            _extension["path"] = "(loaded before)"
            return True
        try:
            library = build_extension()
            torch.ops.load_library(str(library))
            if not _registered():
                raise ExtensionBuildError(f"{library} did not register torch.classes.lorafuse.OffloadArena")
            _extension["path"] = str(library)
            return True
        except Exception as error:  # any failure means: run the pure-PyTorch path, and say so once
            _extension["error"] = " ".join(str(error).split())
            logger.warning("lorafuse: C++ offload extension unavailable (%s); "
                           "offload uses the pure-PyTorch path", _extension["error"])
            return False


def extension_status() -> str:
    """One line: where the loaded extension came from, or why it is not used (without building)."""
    if _extension["path"] is not None:
        with_cuda = bool(torch.ops.lorafuse.has_cuda())
        return f"extension loaded from {_extension['path']} ({'CUDA' if with_cuda else 'CPU-only'} build)"
    if _extension["error"] is not None:
        return f"extension unavailable: {_extension['error']}"
    if _disabled_by_env():
        return "extension disabled by LORAFUSE_EXTENSION"
    return "extension not loaded yet"


def has_cuda() -> bool:
    """Whether the loaded extension was built with CUDA (False when it is not loaded)."""
    return _extension["path"] is not None and bool(torch.ops.lorafuse.has_cuda())


def warn_built_without_cuda() -> None:
    """One log line, once per process: the extension loaded, but offload on a GPU cannot use it."""
    if not _extension["warned_cpu_only"]:
        _extension["warned_cpu_only"] = True
        logger.warning("lorafuse: the extension was built without CUDA; offload uses the pure-PyTorch path")
