"""The README's Python blocks run as written, in a fresh interpreter from the repository root (what a user who
copies them gets), and print what their comments say."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(block):
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    if "content_ids(\"heart\")" in block:  # the first example: label IoU 0 on every image, an alias that is not
        assert lines[0] == "[[0. 0. 0. 0.]]"
        text, iou = lines[1].rsplit(" ", 1)
        assert float(iou) > 0.3 and text.startswith("'")
        typed = [float(x) for x in lines[2].strip("[]").split()]
        assert abs(sum(typed) / len(typed) - float(iou)) < 1e-5  # typing the alias's text scores what it found
