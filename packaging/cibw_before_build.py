"""adamcpp's wheel builds (cibuildwheel's before-build, .ci/wheel): append the notice of the OpenMP runtime that the
platform's repair tool bundles into the wheel (auditwheel: libgomp, delocate: libomp, delvewheel: libomp140) to the
LICENSE of the tree being built. A second run changes nothing.

    python packaging/cibw_before_build.py PROJECT_DIR [linux|macos|windows]
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLATFORMS = {"Linux": "linux", "Darwin": "macos", "Windows": "windows"}


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        sys.stderr.write(__doc__ or "")
        return 2
    project = Path(argv[0])
    name = argv[1] if len(argv) == 2 else PLATFORMS.get(platform.system())
    if name not in PLATFORMS.values():
        sys.stderr.write(f"cibw_before_build.py: unknown platform {name or platform.system()!r}\n")
        return 2
    notice = (HERE / f"LICENSE_{name}.txt").read_text(encoding="utf-8")
    license_file = project / "LICENSE"
    text = license_file.read_text(encoding="utf-8")
    if notice.strip() in text:
        print(f"cibw_before_build.py: {license_file} already carries the {name} notice")
        return 0
    license_file.write_text(text + notice, encoding="utf-8")
    print(f"cibw_before_build.py: appended the {name} OpenMP runtime notice to {license_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
