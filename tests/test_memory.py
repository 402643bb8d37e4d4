"""Offloaded runs stay within cpu_memory plus the resident weights (peak RSS,
measured in a child process, over the interpreter's own footprint)."""

import json
import subprocess
import sys

import pytest

from offload.bench import make_synthetic_mixtral

CHILD = """
import json, sys, psutil, torch
torch.set_num_threads(1)
import offload
from offload.bench import peak_rss
base = psutil.Process().memory_info().rss
llm = offload.load(sys.argv[1], device="cpu", cpu_memory=json.loads(sys.argv[2]))
llm.generate(list(range(3, 35)), max_new_tokens=16)
peak = peak_rss()
print(json.dumps(dict(growth=peak - base, misses=llm.stats.misses, resident=llm.placement.resident_bytes,
                      mode=llm.placement.mode, experts=llm.placement.total_experts * llm.placement.expert_bytes)))
"""
EXPERT = 3 * 1024 * 2048 * 2  # bytes of one bf16 expert below
# What a first forward costs whatever the model: oneDNN/MKL kernels and buffers, thread pools, allocator slack.
RUNTIME = 160 << 20


def peak_growth(path, cpu_memory):
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(cpu_memory)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    # 4 layers x 8 experts x 12 MiB (bf16) = 384 MiB of experts
    return make_synthetic_mixtral(tmp_path_factory.mktemp("synth") / "m", layers=4, hidden=1024,
                                  intermediate=2048, vocab=4096)


def test_peak_rss_stays_within_budget(synthetic):
    budget = 8 * EXPERT  # 8 slots = 96 MiB, a quarter of the experts
    offloaded = peak_growth(synthetic, budget)
    assert offloaded["mode"] == "offloaded" and offloaded["misses"] > 0
    limit = budget + offloaded["resident"] + RUNTIME
    assert limit < offloaded["experts"]  # the bound is tight enough to fail if experts were all loaded
    assert offloaded["growth"] <= limit, offloaded
    resident = peak_growth(synthetic, None)
    assert resident["mode"] == "resident" and resident["growth"] > offloaded["experts"]
