"""Bad input gives one OffloadError whose message says what to do."""

import json
import shutil

import pytest
import torch

import offload
from offload import OffloadError


@pytest.fixture
def copy_of(model_dir, tmp_path):
    def make(family="mixtral", **kwargs):
        dst = tmp_path / "model"
        shutil.copytree(model_dir(family, **kwargs), dst)
        return dst

    return make


def test_missing_shard(copy_of):
    path = copy_of("olmoe", shard="30KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (path / victim).unlink()
    with pytest.raises(OffloadError, match=f"lacks shard.*{victim}.*download"):
        offload.load(path, device="cpu")


def test_truncated_shard(copy_of):
    path = copy_of()
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OffloadError, match="damaged or truncated|cannot read"):
        offload.load(path, device="cpu")


def test_corrupt_config(copy_of):
    path = copy_of()
    (path / "config.json").write_text('{"architectures": ["MixtralForCausalLM"], ')
    with pytest.raises(OffloadError, match="config.json is not valid JSON"):
        offload.load(path, device="cpu")


def test_missing_config(copy_of):
    path = copy_of()
    (path / "config.json").unlink()
    with pytest.raises(OffloadError, match="config.json is missing"):
        offload.load(path, device="cpu")


def test_unknown_architecture_lists_supported(copy_of):
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["JambaForCausalLM"], "jamba"  # GPT-OSS is supported now
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OffloadError) as err:
        offload.load(path, device="cpu")
    message = str(err.value)
    assert "JambaForCausalLM" in message
    for name in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        assert name in message


def test_config_that_does_not_match_weights(copy_of):
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OffloadError, match="shape"):
        offload.load(path, device="cpu")


def test_missing_directory(tmp_path):
    with pytest.raises(OffloadError, match="does not exist"):
        offload.load(tmp_path / "nope", device="cpu")


def test_prompt_over_context(model_dir):
    llm = offload.load(model_dir("mixtral"), device="cpu")  # context 128
    with pytest.raises(OffloadError, match="context is 128.*shorten"):
        llm.generate([5] * 200, max_new_tokens=4)
    with pytest.raises(OffloadError, match="context"):
        llm.logits(torch.full((1, 129), 5))
    # a prompt that fits stops at the end of the context, whatever max_new_tokens says
    result = llm.generate([5] * 120, max_new_tokens=50)
    assert len(result.token_ids) <= 8
    assert result.finish_reason in ("context", "eos")


def test_token_ids_outside_vocabulary(model_dir):
    llm = offload.load(model_dir("mixtral"), device="cpu")
    with pytest.raises(OffloadError, match="outside the vocabulary"):
        llm.generate([1, 5000])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(cache_policy="fifo"), "cache_policy.*lru"),
        (dict(predictor="magic"), "predictor.*gate"),
        (dict(gpu_memory="lots"), "gpu_memory.*6GiB"),
        (dict(cpu_memory=-1), "cpu_memory"),
        (dict(device="tpu"), "device"),
        (dict(dtype="int3"), "dtype"),
        (dict(cache_split="per-layer"), "cache_split.*auto, layer, global"),
        (dict(threads=0), "threads=0 must be a whole number of at least 1"),
        (dict(threads="4"), "threads='4' must be a whole number"),
    ],
)
def test_bad_options(model_dir, kwargs, pattern):
    with pytest.raises(OffloadError, match=pattern):
        offload.load(model_dir("mixtral"), **{"device": "cpu", **kwargs})


def test_bad_sampling_options(model_dir):
    llm = offload.load(model_dir("mixtral"), device="cpu")
    for kwargs in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop=[""])):
        with pytest.raises(OffloadError):
            llm.generate([1, 2, 3], **kwargs)
    with pytest.raises(OffloadError, match="empty"):
        llm.generate([])


def test_hub_id_offline_names_the_local_alternative(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OffloadError, match="could not download 'no-such-org/no-such-model'.*local directory"):
        offload.load("no-such-org/no-such-model", device="cpu")
