"""Print lorafuse's requirements (build, runtime, dev but the optional ones) that this Python lacks, one a line.

Exit status 0 when nothing is missing: setup can then install lorafuse alone, offline. Used by
scripts/bootstrap.sh; run it from the repository root.
"""

import sys
from importlib.metadata import PackageNotFoundError, version

# dev tools whose absence costs a lint run or skips a test (with the reason), never the setup: a machine
# without network but with everything else (a lent GPU image) still installs lorafuse offline
OPTIONAL = ("ruff", "gguf", "selenium")


def main() -> int:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            print("(cannot read pyproject.toml: Python 3.10 without tomli)")
            return 1
    try:
        from packaging.requirements import Requirement
    except ImportError:
        print("packaging")
        return 1
    with open("pyproject.toml", "rb") as fh:
        pyproject = tomllib.load(fh)
    project = pyproject["project"]
    wanted = (pyproject["build-system"]["requires"] + project["dependencies"]
              + [r for r in project["optional-dependencies"]["dev"] if not r.startswith(OPTIONAL)])
    missing = []
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            found = version(req.name)
        except PackageNotFoundError:
            missing.append(req.name)
            continue
        if not req.specifier.contains(found, prereleases=True):
            missing.append(f"{req.name}{req.specifier} (found {found})")
    print("\n".join(missing))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
