"""Never silently wrong: damaged shards are refused at load, a read that fails mid-generation
leaves the caches consistent (the next call works), and NaN logits are an error, not empty text."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from offload.cache.store import ExpertReader, safetensors_extents
from offload.errors import OffloadError


def write_raw(path, header: dict, data: bytes, header_len: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)
    return path


def entry(start, end, shape, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize("header,data,message", [
    ({"a": entry(0, 16, [4]), "b": entry(8, 24, [4])}, bytes(24), "overlap"),
    ({"a": entry(0, 32, [8])}, bytes(16), "inside the file"),
    ({"a": entry(16, 8, [2])}, bytes(16), "do not hold"),
    ({"a": entry(0, 12, [4])}, bytes(16), "do not hold"),  # 12 bytes cannot be 4 float32
    ({"a": entry(0, 16, [-4])}, bytes(16), "malformed"),
    ({"a": {"dtype": "F32"}}, bytes(16), "malformed"),
    ({"a": entry(0, 16, [4], "Q4")}, bytes(16), "dtype Q4"),
])
def test_the_reader_checks_every_extent(tmp_path, header, data, message):
    with pytest.raises(ValueError, match=message):
        safetensors_extents(write_raw(tmp_path / "x.safetensors", header, data))


def test_the_reader_bounds_the_header(tmp_path):
    with pytest.raises(ValueError, match="header length"):
        safetensors_extents(write_raw(tmp_path / "a.safetensors", {}, b"", header_len=1 << 62))
    path = tmp_path / "b.safetensors"
    text = b"[1, 2]"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ValueError, match="not a JSON object"):
        safetensors_extents(path)
    good = {"a": entry(0, 16, [4]), "b": entry(16, 24, [2])}
    extents = safetensors_extents(write_raw(tmp_path / "c.safetensors", good, bytes(24)))
    assert extents["b"].nbytes == 8 and extents["b"].shape == (2,)


@pytest.fixture
def sharded(model_dir, tmp_path):
    """A copy of a tiny Mixtral whose experts live in an expert-only shard (safetensors never opens it)."""
    src = model_dir("mixtral", num_local_experts=4)
    path = tmp_path / "m"
    path.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, path / f.name)
    tensors = load_file(src / "model.safetensors")
    experts = {n: t for n, t in tensors.items() if ".experts." in n}
    save_file({n: t for n, t in tensors.items() if n not in experts}, path / "rest.safetensors")
    save_file(experts, path / "experts.safetensors")
    weight_map = {n: ("experts.safetensors" if n in experts else "rest.safetensors") for n in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path, experts


def rewrite_header(path, change):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: offsets stay valid
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])


def test_a_damaged_expert_only_shard_is_refused_at_load(sharded):
    path, experts = sharded
    expected = offload.load(path, device="cpu").logits([[1, 2, 3]])
    shard = path / "experts.safetensors"
    original = shard.read_bytes()
    names = sorted(experts)

    def overlap(h):
        h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]

    def transpose(h):
        h[names[0]]["shape"] = h[names[0]]["shape"][::-1]

    for change, message in [(overlap, "overlap"), (transpose, "has shape")]:
        shard.write_bytes(original)
        rewrite_header(shard, change)
        for budget in (None, "64KiB"):
            with pytest.raises(OffloadError, match=message):
                offload.load(path, device="cpu", cpu_memory=budget)
    shard.write_bytes(original[:-100])  # truncated
    with pytest.raises(OffloadError, match="damaged"):
        offload.load(path, device="cpu", cpu_memory="64KiB")
    shard.write_bytes(original)
    assert torch.equal(offload.load(path, device="cpu", cpu_memory="64KiB").logits([[1, 2, 3]]), expected)


def test_an_index_naming_the_wrong_shard_is_one_clear_error(sharded):
    path, experts = sharded
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][sorted(experts)[0]] = "rest.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(OffloadError, match="has no such tensor"):
        offload.load(path, device="cpu")


def test_a_failed_read_leaves_the_cache_consistent(model_dir, monkeypatch):
    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    prompt = [[5, 9, 17, 33, 65, 129, 7, 11]]
    expected = offload.load(path, device="cpu").logits(prompt)
    per_expert = offload.load(path, device="cpu").placement.expert_bytes
    llm = offload.load(path, device="cpu", cpu_memory=4 * per_expert, cache_split="global", predictor="gate")
    real, calls = ExpertReader.read, []

    def flaky(self, layer, expert, targets):
        calls.append((layer, expert))
        if len(calls) in (3, 4):  # a demand read, then whatever comes next (prefetch or demand)
            raise OSError("simulated I/O error")
        return real(self, layer, expert, targets)

    monkeypatch.setattr(ExpertReader, "read", flaky)
    with pytest.raises(OffloadError, match="simulated I/O error"):
        llm.logits(prompt)
    for _ in range(2):  # the failed experts were forgotten: read again, never used half-read
        assert torch.equal(llm.logits(prompt), expected)
    engine = llm.experts
    assert not engine.outstanding and not engine.prefetching
    assert len(engine.cache.slot_of) == len(engine.cache.key_of) <= 4


def test_nan_weights_are_an_error_not_empty_text(model_dir, tmp_path):
    src = model_dir("mixtral")
    path = tmp_path / "nan"
    shutil.copytree(src, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, path / "model.safetensors")
    llm = offload.load(path, device="cpu")
    for temperature in (0.0, 0.7):
        with pytest.raises(OffloadError, match="NaN or infinite logits"):
            llm.generate([1, 2, 3], max_new_tokens=4, temperature=temperature)


# ---- bad input: one clear error each ---------------------------------------------------------

@pytest.fixture
def demo_copy(tmp_path):
    path = tmp_path / "demo"
    shutil.copytree(offload.load(None).path, path)
    return path


def cli(args):
    from click.testing import CliRunner

    from offload.cli import main

    return CliRunner().invoke(main, args)


def assert_clean(result, message):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert message in result.output


def test_bad_configs_and_tokenizer_files(demo_copy):
    config = json.loads((demo_copy / "config.json").read_text())
    (demo_copy / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    with pytest.raises(OffloadError, match="non-positive"):
        offload.load(demo_copy)
    (demo_copy / "config.json").write_text(json.dumps(config))
    good = (demo_copy / "tokenizer_config.json").read_bytes()
    (demo_copy / "tokenizer_config.json").write_bytes(b'{"bos_token": "\xff\xfe"}')
    with pytest.raises(OffloadError, match="not valid UTF-8 JSON"):
        offload.load(demo_copy)
    (demo_copy / "tokenizer_config.json").write_bytes(good)
    (demo_copy / "chat_template.jinja").write_bytes(b"{{ messages \xff }}")
    with pytest.raises(OffloadError, match="not UTF-8"):
        offload.load(demo_copy)


def test_predictor_files_of_another_model_or_damaged(demo_copy, model_dir):
    from offload.predictors.learned import LearnedPredictor

    other = LearnedPredictor({(0, 1): (torch.zeros(4, 32), torch.zeros(4))}, num_layers=2, lookahead=1)
    other.save(demo_copy)
    with pytest.raises(OffloadError, match="trained for another model"):
        offload.load(demo_copy, cpu_memory="4MiB", predictor="learned")
    (demo_copy / "predictor.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(OffloadError, match="cannot read the predictor"):
        offload.load(demo_copy, cpu_memory="4MiB", predictor="learned")
    # The damaged file is not a weight shard: the model loads and runs without it.
    assert offload.load(demo_copy, predictor="none").generate("ROMEO:", max_new_tokens=2).token_ids


@pytest.mark.parametrize("args,message", [
    (["-t", "nan"], "temperature=nan"),
    (["-t", "-1"], "temperature=-1.0"),
    (["--top-p", "nan"], "top_p=nan"),
    (["--seed", str(2**70)], "seed="),
    (["-n", "0"], "max_new_tokens=0"),
])
def test_bad_sampling_options(args, message):
    assert_clean(cli(["generate", "-p", "ROMEO:", *args]), message)


def test_chat_messages_must_hold_text():
    llm = offload.load(None)
    for messages in ([{"role": "user", "content": None}], [{"role": "user"}], "hello", [["user", "hi"]]):
        with pytest.raises(OffloadError, match="messages must be a list"):
            llm.chat(messages, max_new_tokens=2)


def test_trace_and_train_predictor_refuse_bad_input(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    assert_clean(cli(["trace", "offload/demo_model", "--prompts", str(tmp_path / "latin1.txt"), "--out",
                      str(tmp_path / "t")]), "not UTF-8")
    (tmp_path / "p.txt").write_text("ROMEO: hello\n")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = cli(["trace", "offload/demo_model", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "link")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "real" / "header.json").exists() and (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt", "link", "p.txt", "real"]  # no temp left
    for args, message in ((["--epochs", "0"], "--epochs 0"), (["--lookahead", "0"], "--lookahead 0"),
                          (["--lookahead", "9"], "--lookahead 9")):
        assert_clean(cli(["train-predictor", "offload/demo_model", "--trace", "tests/data/demo_trace", *args,
                          "--out", str(tmp_path / "pred.safetensors")]), message)
