"""Every shell and Python block of the README runs, as written, so the front door cannot rot.

Blocks are taken from README.md in order. A block preceded by ``<!-- readme-test: skip: WHY
-->`` is not run (only the install lines, which CI itself runs through ``.ci/run``, and
commands that need data or hardware a test cannot have); every other ``bash``/``python`` block
runs in one scratch folder shared by all blocks (so a later block can use an earlier block's
run), with the package's ``nirdml`` on PATH and ``$OMNIGLOT`` pointing at a small synthetic
Omniglot in the official npz format.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?P<marker><!-- readme-test: (?P<directive>[^>]*?) -->\s*\n)?"
                   r"```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """``(language, code, skip reason or None)`` of every bash/python block of README.md."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for m in FENCE.finditer(text):
        directive = (m.group("directive") or "").strip()
        skip = directive.split(":", 1)[1].strip() if directive.startswith("skip") else None
        blocks.append((m.group("lang"), m.group("code"), skip))
    return blocks


def _synthetic_omniglot(root: Path) -> None:
    """The official npz pair (bool, True = white background): 56 + 12 classes of 20 drawings."""
    rng = np.random.default_rng(0)
    for part, classes in (("images_background", 56), ("images_evaluation", 12)):
        images = np.ones((classes, 20, 105, 105), dtype=bool)
        for c in range(classes):
            r, s = rng.integers(15, 90, 2)
            for d in range(20):
                j = rng.integers(-3, 4, 2)
                images[c, d, r + j[0], 10:95] = False
                images[c, d, 10:95, s + j[1]] = False
        labels = np.repeat(np.arange(classes), 20).reshape(classes, 20)
        np.savez_compressed(root / f"{part}.npz", images=images, labels=labels)


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) >= 5
    for _lang, code, skip in blocks:
        if skip is not None:
            assert len(skip) > 10, f"a skipped README block must say why: {code[:80]!r}"
    run = [b for b in blocks if b[2] is None]
    assert any(lang == "python" for lang, _, _ in run) and any(lang == "bash" for lang, _, _ in run)


@pytest.mark.slow
def test_readme_blocks_run_as_written(tmp_path):
    data = tmp_path / "omniglot"
    data.mkdir()
    _synthetic_omniglot(data)
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "OMNIGLOT": str(data), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "NIRDML_CACHE": str(tmp_path / "cache")}
    for i, (lang, code, skip) in enumerate(readme_blocks()):
        if skip is not None:
            continue
        if lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        else:
            cmd = [sys.executable, "-c", code]
        res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, (
            f"README block {i} ({lang}) failed:\n{code}\n--- stdout\n{res.stdout[-3000:]}\n"
            f"--- stderr\n{res.stderr[-3000:]}")
