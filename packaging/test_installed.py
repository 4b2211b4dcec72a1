"""Runs adamcpp's test suite against the INSTALLED package (a wheel), from a copy of tests/ outside the source tree.

    python packaging/test_installed.py [pytest arguments...]

The copy sits in a temporary directory with pyproject.toml beside it (pytest's configuration: strict markers,
warnings as errors), so nothing of the checkout is importable: `import adamcpp` must find the installed package,
and this script stops if it finds the checkout's instead. The tests that need the tree (docs/, examples/, bench/,
cpp/) or a compiler skip with the reason. cibuildwheel's test-command and .ci/wheel both run it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="adamcpp-tests-") as tmp:
        where = Path(tmp)
        shutil.copytree(PROJECT / "tests", where / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(PROJECT / "pyproject.toml", where / "pyproject.toml")
        found = subprocess.run(
            [sys.executable, "-c", "import adamcpp, sys; sys.stdout.write(adamcpp.__file__)"],
            cwd=where,
            capture_output=True,
            text=True,
        )
        if found.returncode:
            sys.stderr.write(f"test_installed.py: adamcpp does not import:\n{found.stderr}")
            return 1
        module = Path(found.stdout).resolve()
        if PROJECT / "python" in module.parents:
            sys.stderr.write(
                f"test_installed.py: adamcpp imports from the checkout ({module}), not an installed wheel\n"
            )
            return 1
        print(f"test_installed.py: adamcpp from {module.parent}; tests copied to {where}", flush=True)
        return subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=where)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
