"""Every ```python block of README.md, docs/guide.md, docs/api.md and the PyPI page (packaging/README.pypi.md)
runs; the PyPI page links nowhere into the repository (PyPI cannot follow relative links).

The blocks of one file run in order in one namespace (later snippets build on
earlier ones), in a fresh interpreter per file: a snippet that changes
process-wide settings (adamcpp.set_num_threads, the SIMD target) cannot leak
into the other tests, and warnings are errors there as they are here. A failure
names the file and the line where the failing block starts, with the
traceback's line numbers pointing into the Markdown file itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import source_tree

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/guide.md", "docs/api.md", "packaging/README.pypi.md"]
needs_docs = pytest.mark.skipif(
    source_tree(*DOCS) is None, reason="needs the source tree's README.md and docs/ (tests run against an installed package)"
)

# An opening fence "```python" (nothing else on the line) up to the next "```".
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> List[Tuple[int, str]]:
    """(line of the first code line, code) for every ```python block, in order."""
    blocks = []
    for match in _FENCE.finditer(text):
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((first_line, match.group(1)))
    return blocks


# Runs in the child: reads [(line, code), ...] from stdin and the file name from argv,
# executes the blocks in one namespace. Each block is compiled with blank lines
# in front, so traceback line numbers are the Markdown file's line numbers.
_RUNNER = r"""
import json, sys, traceback
path, blocks = sys.argv[1], json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
for line, code in blocks:
    try:
        exec(compile("\n" * (line - 1) + code, path, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the python block at {path}:{line} raised (see the traceback above)", file=sys.stderr)
        sys.exit(1)
print(f"ran {len(blocks)} block(s) of {path}")
"""


@needs_docs
@pytest.mark.parametrize("relpath", DOCS)
def test_python_blocks_run(relpath: str) -> None:
    path = ROOT / relpath
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    assert blocks, f"{relpath}: no ```python blocks found"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _RUNNER, str(path)],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=str(path.parent),  # relative paths in a snippet resolve next to its file
        timeout=300,
    )
    assert done.returncode == 0, f"{relpath}: a python block failed\n{done.stderr}\n--- stdout ---\n{done.stdout}"
    assert f"ran {len(blocks)} block(s)" in done.stdout


@needs_docs
def test_guide_shows_the_comparison_plot() -> None:
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    assert re.search(r"!\[[^\]]*\]\(compare\.png\)", guide), "docs/guide.md must embed ![...](compare.png)"
    image = ROOT / "docs" / "compare.png"
    assert image.is_file(), "docs/compare.png is missing (python3 bench/mlp_study.py --compare --plot docs/compare.png)"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "docs/compare.png is not a PNG file"


def test_block_extraction_reports_lines() -> None:
    text = "intro\n```python\nx = 1\n```\ntext\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = x\n")]


@needs_docs
def test_pypi_page_has_no_relative_links() -> None:
    """PyPI renders the project page without the repository: every link and image must be absolute."""
    page = (ROOT / "packaging" / "README.pypi.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)]+)\)", page) + re.findall(r"<img[^>]+src=\"([^\"]+)\"", page)
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert not relative, f"packaging/README.pypi.md links relatively to {relative}"
    assert "pip install adamcpp" in page

