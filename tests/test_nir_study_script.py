"""benchmarks/nir_study.py: a test phase run for one more arm keeps the earlier arms' rows."""

import json
from pathlib import Path
from types import SimpleNamespace

from conftest import load_benchmark


def _finished(runs: Path, arm_slug: str, seed: int, r1: float) -> None:
    folder = runs / f"{arm_slug}-seed{seed}"
    folder.mkdir(parents=True)
    (folder / "final.json").write_text(json.dumps({"recall@1": r1}))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val/recall@1": r1}) + "\n")


def test_earlier_arms_are_read_back_not_retrained_and_unfinished_ones_left_out(tmp_path):
    mod = load_benchmark("nir_study")
    folder = tmp_path / "f" / "proxy_anchor"
    runs = folder / "runs"
    for seed in (1, 2):
        _finished(runs, "base", seed, 0.5 + seed / 100)
    _finished(runs, mod.slug("paper/dim+warmup w=0.3"), 1, 0.6)  # seed 2 missing
    table = folder / "test.json"
    table.write_text(json.dumps([{"arm": "base"}, {"arm": "paper/dim+warmup w=0.3"},
                                 {"arm": "release"}]))
    args = SimpleNamespace(setting="f", loss="proxy_anchor", out=tmp_path, root=tmp_path,
                           extra=[])
    new = {"release": [{"final": {"recall@1": 0.4}}, {"final": {"recall@1": 0.41}}]}
    merged = mod.with_earlier_arms(new, table, args, [1, 2])
    assert list(merged) == ["base", "release"]  # the unfinished arm is not trained here
    assert [r["final"]["recall@1"] for r in merged["base"]] == [0.51, 0.52]
    assert merged["release"] is new["release"]  # this invocation's runs win
    assert mod.with_earlier_arms(new, tmp_path / "none.json", args, [1, 2]) is new
    args.extra = ["optim.weight_decay=0"]  # runs trained otherwise are not mixed in
    assert mod.with_earlier_arms(new, table, args, [1, 2]) is new
