"""Never silently wrong: damaged shards are refused at load, a read that fails mid-generation
leaves the caches consistent (the next call works), and NaN logits are an error, not empty text."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

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


@pytest.mark.parametrize("tiered", [False, True])
def test_ctrl_c_between_placing_an_expert_and_reading_it_leaves_no_stale_slot(model_dir, monkeypatch, tiered):
    """The plan puts an expert in the caches before the mover submits its read: a Ctrl-C in between
    must not leave it cached over the slot's previous expert (a later step would compute with it)."""
    import dataclasses

    from offload.engine import OffloadedExperts

    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    prompt = [[5, 9, 17, 33, 65, 129, 7, 11]]
    expected = offload.load(path, device="cpu").logits(prompt)
    llm = offload.load(path, device="cpu", cpu_memory=6 * offload.load(path, device="cpu").placement.expert_bytes,
                       cache_split="global", predictor="none")
    if tiered:  # the host tier between disk and the slots, as on a GPU
        placement = dataclasses.replace(llm.placement, host_slots=8)
        llm.experts = OffloadedExperts(llm.checkpoint, placement, llm.device, llm.expert_format, "lru", "global",
                                       llm.stats.experts)
        llm.model.set_executor(llm.experts)
    llm.logits(prompt)  # every slot holds some expert now
    real, calls = OffloadedExperts._fetch, []

    def interrupted(self, fetch):
        calls.append(fetch.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, fetch)

    monkeypatch.setattr(OffloadedExperts, "_fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.logits([[200, 201, 202, 203, 250, 251, 252, 253]])
    assert calls[1] not in llm.experts.cache  # placed, never read: forgotten
    monkeypatch.setattr(OffloadedExperts, "_fetch", real)
    assert torch.equal(llm.logits(prompt), expected)


def test_a_failed_read_leaves_the_cache_consistent(model_dir, monkeypatch):
    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    prompt = [[5, 9, 17, 33, 65, 129, 7, 11]]
    expected = offload.load(path, device="cpu").logits(prompt)
    per_expert = offload.load(path, device="cpu").placement.expert_bytes
    llm = offload.load(path, device="cpu", cpu_memory=4 * per_expert, cache_split="global", predictor="gate")
    real, calls = ExpertReader.read, []

    def flaky(self, layer, expert, targets, ticket=None):
        calls.append((layer, expert))
        if len(calls) in (3, 4):  # a demand read, then whatever comes next (prefetch or demand)
            raise OSError("simulated I/O error")
        return real(self, layer, expert, targets, ticket)

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
    """Exit code 2 and one error line: ours ("error: ...", an OffloadError) or click's ("Error: Invalid value ...")."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.lower().count("error:") == 1
    assert message in result.output


DEMO = str(Path(offload.__file__).parent / "demo_model")
TRACE = str(Path(__file__).parent / "data" / "demo_trace")

# Every flag that takes a number says its range, and is refused before any model loads or case runs.
BAD_FLAGS = [
    (["bench", DEMO, "--repeats", "0"], "'--repeats': 0 is not in the range x>=1"),
    (["bench", DEMO, "--repeats", "-2"], "'--repeats': -2 is not in the range x>=1"),
    (["bench", DEMO, "--rounds", "0"], "'--rounds': 0 is not in the range x>=1"),
    (["bench", DEMO, "--new-tokens", "0"], "'--new-tokens': 0 is not in the range x>=1"),
    (["bench", DEMO, "--prompt-tokens", "0"], "'--prompt-tokens': 0 is not in the range x>=1"),
    (["bench", DEMO, "--predictors", "bogus"], "give some of none, gate, learned, affinity"),
    (["bench", DEMO, "--predictors", "none,"], "give some of none, gate, learned, affinity"),
    (["simulate", "--trace", TRACE, "--tokens", "-3"], "'--tokens': -3 is not in the range x>=1"),
    (["simulate", "--trace", TRACE, "--tokens", "0"], "'--tokens': 0 is not in the range x>=1"),
    (["simulate", "--trace", TRACE, "--prompt-tokens", "-1"], "'--prompt-tokens': -1 is not in the range x>=0"),
    (["simulate", "--trace", TRACE, "--cpu-memory", "-1"], "cpu_memory='-1' is not a memory size"),
    (["simulate", "--trace", TRACE, "--gpu-memory", "0"], "gpu_memory='0' must be positive"),
    (["simulate", "--trace", TRACE, "--shape", DEMO, "--cpu-memory", "1KiB"],
     "it needs at least 1.31 MiB for 2 expert slots (one token's top_k experts)"),
    (["eval-predictor", "--trace", TRACE, "--slots-per-layer", "-1"], "'--slots-per-layer': -1 is not in the range"),
    (["eval-predictor", "--trace", TRACE, "--slots-per-layer", "0"], "'--slots-per-layer': 0 is not in the range"),
    (["eval-predictor", "--trace", TRACE, "--slots-per-layer", "1"], "between top_k (2) and the number of experts"),
    (["eval-predictor", "--trace", TRACE, "--slots-per-layer", "9"], "between top_k (2) and the number of experts"),
    (["eval-predictor", "--trace", TRACE, "--train-fraction", "0"], "0.0 is not in the range 0<x<1"),
    (["eval-predictor", "--trace", TRACE, "--train-fraction", "1"], "1.0 is not in the range 0<x<1"),
    (["eval-predictor", "--trace", TRACE, "--train-fraction", "nan"], "nan is not a finite number in the range 0<x<1"),
    (["eval-predictor", "--trace", TRACE, "--epochs", "0"], "'--epochs': 0 is not in the range x>=1"),
    (["train-predictor", DEMO, "--trace", TRACE, "--epochs", "0"], "'--epochs': 0 is not in the range x>=1"),
    (["train-predictor", DEMO, "--trace", TRACE, "--lookahead", "0"], "'--lookahead': 0 is not in the range x>=1"),
    (["train-predictor", DEMO, "--trace", TRACE, "--lookahead", "4"], "--lookahead 4 must be between 1 and"),
    (["quantize", "--bits", "4", "--group-size", "0", "--out", "q"], "'--group-size': 0 is not in the range x>=1"),
]


@pytest.mark.parametrize("args,message", BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_bad_flags_are_refused_up_front(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out and --json defaults land here, where nothing may appear
    before = sorted((p.name, p.stat().st_mtime_ns) for p in Path(DEMO).iterdir())
    outputs = {"bench": ["--json", "b.json"], "train-predictor": ["--out", "p.safetensors"]}.get(args[0], [])
    assert_clean(cli([*args, *outputs]), message)
    assert os.listdir(tmp_path) == []
    assert sorted((p.name, p.stat().st_mtime_ns) for p in Path(DEMO).iterdir()) == before


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


@pytest.mark.parametrize("command", [["generate", "-p", "ROMEO:"], ["chat"]])
@pytest.mark.parametrize("args,message", [
    (["-t", "nan"], "'--temperature' / '-t': nan is not a finite number in the range x>=0"),
    (["--temperature", "inf"], "inf is not a finite number in the range x>=0"),
    (["-t", "-1"], "-1.0 is not in the range x>=0"),
    (["--top-p", "nan"], "'--top-p': nan is not a finite number in the range 0<x<=1"),
    (["--top-p", "0"], "0.0 is not in the range 0<x<=1"),
    (["--top-p", "1.5"], "1.5 is not in the range 0<x<=1"),
    (["--top-k", "-1"], "'--top-k': -1 is not in the range x>=0"),
    (["--seed", str(2**70)], f"'--seed': {2**70} is not in the range 0<=x<={2**63 - 1}"),
    (["--seed", "-1"], "'--seed': -1 is not in the range"),
    (["-n", "0"], "'--max-new-tokens' / '-n': 0 is not in the range x>=1"),
])
def test_bad_sampling_options(command, args, message):
    # chat used to start anyway and print the error after every message, exiting 0
    assert_clean(cli([*command, *args]), message)


def test_the_cli_sampling_ranges_end_where_the_apis_do():
    edges = ["-n", "1", "-t", "0.5", "--top-p", "1", "--top-k", "0", "--seed", str(2**63 - 1)]
    result = cli(["generate", "-p", "ROMEO:", *edges])
    assert result.exit_code == 0, result.output


def test_chat_messages_must_hold_text():
    llm = offload.load(None)
    for messages in ([{"role": "user", "content": None}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], [{"role": "user"}],
                     [{"content": "hi"}], [{"role": None, "content": "hi"}], [{"role": 5, "content": "hi"}],
                     "hello", [["user", "hi"]], None):
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
    # train-predictor's bad flags: BAD_FLAGS


def test_an_empty_conversation_and_a_zero_group_size_are_refused(tmp_path):
    from offload.quantize import quantize_model

    llm = offload.load()
    with pytest.raises(offload.OffloadError, match="messages is empty"):
        llm.chat([])
    with pytest.raises(offload.OffloadError, match="group_size=0"):
        quantize_model(None, tmp_path / "q", "int4", group_size=0, progress=False)
    assert not (tmp_path / "q").exists()
