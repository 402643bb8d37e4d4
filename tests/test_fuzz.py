"""Crafted damage, seeded: every mutation of an expert-only shard's header (which safetensors
never checks for us: we pread from it) and of config.json ends in one clean OffloadError or in
a run that works; a damaged header never yields logits different from the intact model's."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from test_reliability import sharded  # noqa: F401 (fixture)

import offload
from offload.errors import OffloadError

DTYPES = ["F32", "F16", "BF16", "I32", "I8", "U8", "F64", "Q4", ""]
VALUES = [0, -1, 1, 2, 10**12, 3.5, "x", None, [], {}, True, float("nan")]


def mutate_header(raw: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8:8 + n], raw[8 + n:]
    kind = rng.choice(["offsets", "shape", "dtype", "drop", "flip", "truncate", "length"])
    if kind == "flip":  # a random byte of the JSON text
        i = rng.randrange(len(header))
        header = header[:i] + bytes([rng.randrange(256)]) + header[i + 1:]
        return raw[:8] + header + data
    if kind == "truncate":
        return raw[:rng.randrange(len(raw))]
    if kind == "length":
        return struct.pack("<Q", rng.choice([0, n - 1, n + 7, len(raw), 2**40])) + raw[8:]
    obj = json.loads(header)
    name = rng.choice([k for k in obj if k != "__metadata__"])
    if kind == "offsets":
        size = len(data)
        obj[name]["data_offsets"] = [rng.randrange(-8, size + 64), rng.randrange(-8, size + 64)]
    elif kind == "shape":
        obj[name]["shape"] = rng.choice([obj[name]["shape"][::-1], [rng.randrange(-2, 200)],
                                         obj[name]["shape"] + [1], [], ["x"]])
    elif kind == "dtype":
        obj[name]["dtype"] = rng.choice(DTYPES)
    else:
        del obj[name]
    text = json.dumps(obj).encode()
    return struct.pack("<Q", len(text)) + text + data


def outcome(path, budget):
    try:
        llm = offload.load(path, device="cpu", cpu_memory=budget, predictor="none")
        return llm.logits([[1, 5, 9, 200, 17]])
    except OffloadError as exc:
        assert "\n" not in str(exc).strip() and "Traceback" not in str(exc)
        return None


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("FUZZ_SEEDS", 4))))
def test_damaged_headers_never_give_wrong_logits(sharded, seed):  # noqa: F811
    path, _ = sharded
    shard = path / "experts.safetensors"
    intact = shard.read_bytes()
    expected = outcome(path, None)
    rng = random.Random(seed)
    errors = 0
    for case in range(25):
        shard.write_bytes(mutate_header(intact, rng))
        for budget in (None, "64KiB"):  # resident, and read on demand by the offloaded engine
            got = outcome(path, budget)
            if got is None:
                errors += 1
            else:  # a mutation that changed nothing that matters (e.g. a byte of the metadata)
                assert torch.equal(got, expected), f"seed {seed} case {case}: wrong logits, no error"
    assert errors > 0


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("FUZZ_SEEDS", 3))))
def test_damaged_configs_end_in_a_clean_error_or_a_run(sharded, seed):  # noqa: F811
    path, _ = sharded
    original = json.loads((path / "config.json").read_text())
    rng = random.Random(seed)
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "num_local_experts", "num_experts_per_tok", "intermediate_size", "max_position_embeddings",
            "rms_norm_eps", "rope_theta", "head_dim", "sliding_window", "tie_word_embeddings", "hidden_act",
            "architectures", "dtype", "eos_token_id"]
    for _ in range(30):
        config = dict(original)
        for key in rng.sample(keys, rng.randrange(1, 3)):
            config[key] = rng.choice(VALUES)
        (path / "config.json").write_text(json.dumps(config))
        logits = outcome(path, None)  # an OffloadError, or a model that runs (the config may be valid)
        assert logits is None or logits.shape[-1] == config.get("vocab_size", original["vocab_size"])
