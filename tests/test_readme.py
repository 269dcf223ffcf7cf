"""Every shell and Python block of the README and of docs/results.md runs, as written, so the
front door and the results page cannot rot.

Blocks are taken from README.md, then from docs/results.md, each in order. A block preceded by
``<!-- readme-test: skip: WHY -->`` is not run (only the install lines, which CI itself runs
through ``.ci/run``, and commands that need data, hardware or hours a test cannot have); every
other ``bash``/``python`` block runs as a test of its own, in a scratch folder of its own (so a
block stands alone, as a reader may run any one of them, and the blocks run in parallel), with
the package's ``nirdml`` on PATH and ``$OMNIGLOT`` pointing at a small synthetic Omniglot in the
official npz format. The relative links of both files (the README points into the results
page for everything that moved there) must name a file that exists and, with ``#anchor``, one of
its headings.
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


DOCS = ("README.md", "docs/results.md")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def doc_blocks(name: str) -> list[tuple[str, str, str | None]]:
    """``(language, code, skip reason or None)`` of every bash/python block of one file."""
    text = (ROOT / name).read_text()
    blocks = []
    for m in FENCE.finditer(text):
        directive = (m.group("directive") or "").strip()
        skip = directive.split(":", 1)[1].strip() if directive.startswith("skip") else None
        blocks.append((m.group("lang"), m.group("code"), skip))
    return blocks


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """The blocks of README.md."""
    return doc_blocks("README.md")


def all_blocks() -> list[tuple[str, str, str, str | None]]:
    """``(file, language, code, skip)`` of every block of README.md, then docs/results.md."""
    return [(name, *block) for name in DOCS for block in doc_blocks(name)]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


DRAWINGS = 4


def _synthetic_omniglot(root: Path) -> None:
    """The official npz pair (bool, True = white background): 56 + 12 classes of 4 drawings
    (the official 20 would make each training epoch five times longer for no other check)."""
    rng = np.random.default_rng(0)
    for part, classes in (("images_background", 56), ("images_evaluation", 12)):
        images = np.ones((classes, DRAWINGS, 105, 105), dtype=bool)
        for c in range(classes):
            r, s = rng.integers(15, 90, 2)
            for d in range(DRAWINGS):
                j = rng.integers(-3, 4, 2)
                images[c, d, r + j[0], 10:95] = False
                images[c, d, 10:95, s + j[1]] = False
        labels = np.repeat(np.arange(classes), DRAWINGS).reshape(classes, DRAWINGS)
        np.savez_compressed(root / f"{part}.npz", images=images, labels=labels)


def test_every_block_is_run_or_says_why_not():
    for name in DOCS:
        assert doc_blocks(name), f"{name} has no bash/python block"
    blocks = all_blocks()
    assert len(blocks) >= 5
    for name, _lang, code, skip in blocks:
        if skip is not None:
            assert len(skip) > 10, f"a skipped block of {name} must say why: {code[:80]!r}"
    run = [b for b in blocks if b[3] is None]
    assert any(lang == "python" for _, lang, _, _ in run)
    assert any(lang == "bash" for _, lang, _, _ in run)
    for name in DOCS:   # each file has a block that runs
        assert any(b[0] == name for b in run), f"no block of {name} runs"


def test_relative_links_resolve():
    for name in DOCS:
        source = ROOT / name
        text = FENCE.sub("", source.read_text())
        for m in LINK.finditer(text):
            target = m.group("target")
            if re.match(r"[a-z]+:", target):
                continue   # an absolute URL
            path, _, anchor = target.partition("#")
            file = (source.parent / path).resolve() if path else source
            assert file.is_file(), f"{name}: link to a missing file: {target}"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                assert anchor in {_anchor(h) for h in headings}, (
                    f"{name}: link to a missing heading: {target}")


#: the blocks that run: (file, index among all blocks, language, code)
RUN = [(name, i, lang, code) for i, (name, lang, code, skip) in enumerate(all_blocks())
       if skip is None]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "index", "lang", "code"), RUN,
                         ids=[f"{name}:{index}" for name, index, _, _ in RUN])
def test_block_runs_as_written(name, index, lang, code, tmp_path):
    data = tmp_path / "omniglot"
    data.mkdir()
    _synthetic_omniglot(data)
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "OMNIGLOT": str(data), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "NIRDML_CACHE": str(tmp_path / "cache")}
    if lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        cmd = [sys.executable, "-c", code]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (
        f"{name} block {index} ({lang}) failed:\n{code}\n--- stdout\n{res.stdout[-3000:]}\n"
        f"--- stderr\n{res.stderr[-3000:]}")
