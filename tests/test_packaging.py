"""The release configuration, checked here although the release itself runs elsewhere: cibuildwheel's build
identifiers for every platform, the release workflow, the metadata's floors and classifiers, and the notices of
the OpenMP runtimes that wheels bundle. .ci/wheel builds, repairs, installs and tests the Linux wheel itself.

Needs the source tree (pyproject.toml, packaging/, .github/); cibuildwheel and PyYAML come with the `packaging`
extra and are skipped without it.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import source_tree

ROOT = source_tree("packaging", ".github/workflows/wheels.yml", "LICENSE")
pytestmark = pytest.mark.skipif(
    ROOT is None,
    reason="needs the source tree's pyproject.toml, packaging/ and .github/ (tests run against an installed package)",
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the floor interpreter
    tomllib = pytest.importorskip("tomli")


def pyproject() -> dict:
    assert ROOT is not None
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def declared_pythons() -> list:
    """The CPython minor versions cibuildwheel builds (its `build` selector), e.g. ["3.10", "3.11"]."""
    build = pyproject()["tool"]["cibuildwheel"]["build"].split()
    return [f"3.{m.group(1)}" for m in (re.fullmatch(r"cp3(\d+)-\*", b) for b in build) if m]


EXPECTED_PLATFORMS = {
    "linux": {"manylinux_x86_64", "manylinux_aarch64", "musllinux_x86_64"},
    "macos": {"macosx_x86_64", "macosx_arm64"},
    "windows": {"win_amd64"},
}


@pytest.mark.parametrize("platform", sorted(EXPECTED_PLATFORMS))
def test_cibuildwheel_builds_what_is_configured(platform):
    """cibuildwheel reads [tool.cibuildwheel] (it refuses unknown options) and would build one wheel per declared
    Python for each configured platform tag: CPU wheels only, no 32-bit, no PyPy."""
    pytest.importorskip("cibuildwheel", reason="the packaging extra (cibuildwheel) is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "cibuildwheel", "--print-build-identifiers", "--platform", platform],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    identifiers = set(done.stdout.split())
    expected = {f"cp{v.replace('.', '')}-{tag}" for v in declared_pythons() for tag in EXPECTED_PLATFORMS[platform]}
    assert identifiers == expected


def test_wheels_are_cpu_only_with_openmp_and_tested():
    cibw = pyproject()["tool"]["cibuildwheel"]
    assert cibw["config-settings"] == {"cmake.define.ADAMCPP_CUDA": "OFF", "cmake.define.ADAMCPP_OPENMP": "ON"}
    assert "packaging/test_installed.py" in cibw["test-command"]
    assert "packaging/cibw_before_build.py" in cibw["before-build"]
    assert "libomp" in cibw["macos"]["before-all"]


def test_release_workflow_builds_tests_and_publishes():
    yaml = pytest.importorskip("yaml", reason="the packaging extra (PyYAML) is not installed")
    assert ROOT is not None
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "wheels.yml").read_text(encoding="utf-8"))
    jobs = flow["jobs"]
    assert set(jobs) == {"sdist", "wheels", "test-artifacts", "publish"}
    oses = jobs["wheels"]["strategy"]["matrix"]["os"]
    assert {"ubuntu-latest", "ubuntu-24.04-arm", "macos-13", "macos-14", "windows-latest"} <= set(oses)
    (action,) = [s["uses"] for s in jobs["wheels"]["steps"] if "cibuildwheel" in s.get("uses", "")]
    pinned = re.search(r'"cibuildwheel==([\d.]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pinned is not None and action == f"pypa/cibuildwheel@v{pinned.group(1)}", action
    tested = {entry["artifact"] for entry in jobs["test-artifacts"]["strategy"]["matrix"]["include"]}
    assert tested == {f"wheels-{os}" for os in oses} | {"sdist"}
    assert set(jobs["test-artifacts"]["needs"]) == {"sdist", "wheels"} and jobs["publish"]["needs"] == [
        "test-artifacts"
    ]
    run = "\n".join(s.get("run", "") for s in jobs["test-artifacts"]["steps"])
    assert "packaging/test_installed.py" in run and "python -m venv clean" in run


def test_metadata_floors_and_classifiers():
    project = pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert project["authors"]
    floor = re.fullmatch(r">=(3\.\d+)", project["requires-python"])
    assert floor is not None
    pythons = declared_pythons()
    assert pythons[0] == floor.group(1), "cibuildwheel must build the oldest Python that requires-python admits"
    versions = {
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert versions == set(pythons), "one classifier per Python version built and tested"
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "python" / "adamcpp" / "py.typed").is_file()
    requires = pyproject()["build-system"]["requires"]
    assert any(re.fullmatch(r"scikit-build-core>=0\.(1[1-9]|[2-9]\d)(\.\d+)?", r) for r in requires), requires


@pytest.mark.parametrize(
    "platform,runtime",
    [
        ("linux", "GCC RUNTIME LIBRARY EXCEPTION"),
        ("macos", "LLVM Exceptions to the Apache 2.0 License"),
        ("windows", "Microsoft Visual C++ OpenMP runtime"),
    ],
)
def test_bundled_runtime_notice_is_appended_once(tmp_path, platform, runtime):
    assert ROOT is not None
    (tmp_path / "LICENSE").write_text((ROOT / "LICENSE").read_text(encoding="utf-8"), encoding="utf-8")
    script = [sys.executable, str(ROOT / "packaging" / "cibw_before_build.py"), str(tmp_path), platform]
    for _ in range(2):
        subprocess.run(script, check=True, capture_output=True, text=True)
    text = (tmp_path / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and text.count(runtime) == 1
    bad = subprocess.run([*script[:-1], "solaris"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown platform" in bad.stderr


def test_project_license_is_mit():
    assert ROOT is not None
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "GCC" not in text, "the checkout's LICENSE is adamcpp's alone"
