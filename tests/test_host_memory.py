"""nirdml.host_memory: freed buffers are reused instead of page-faulted in again."""

import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt thresholds are glibc's")

# A 48 MiB buffer (above glibc's largest automatic mmap threshold, 32 MiB) allocated, written
# and freed in a loop: the kernel's count of minor page faults per round, before and after.
_SCRIPT = """
import resource, sys, torch
from nirdml.host_memory import keep_freed_memory
def faults_per_round(rounds=6):
    for _ in range(15):  # the heap grows to hold it first (a few rounds; then a steady state)
        torch.empty(12 << 20).fill_(1.0)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.empty(12 << 20).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / rounds
before = faults_per_round()
applied = keep_freed_memory()
print(before, faults_per_round(), applied, keep_freed_memory())
"""


@glibc
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         check=True).stdout.split()
    before, after = float(out[0]), float(out[1])
    assert out[2:] == ["True", "True"]  # applied, and idempotent
    # 48 MiB is 12,288 pages of 4 KiB (24 huge pages where the kernel gives them)
    assert before >= 20
    assert after * 10 < before


def test_training_on_the_cpu_keeps_freed_memory_unless_turned_off(tmp_path, monkeypatch):
    import nirdml.training.trainer as trainer_mod
    from nirdml.training.config import load_config

    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    base = ["train.epochs=1", "train.progress=false", "train.tensorboard=false",
            "train.device=cpu"]
    trainer_mod.Trainer(load_config("digits", base), tmp_path / "a")
    assert calls == [1]
    trainer_mod.Trainer(load_config("digits", [*base, "train.keep_host_memory=false"]),
                        tmp_path / "b")
    assert calls == [1]

