"""Hardware profiles: the shipped TOMLs load and say where every figure comes from, profiles
round-trip through save/load, bad values are user errors, and measure() works on this CPU."""

import dataclasses
import re

import pytest

from offload import profile as profile_module
from offload.errors import OffloadError
from offload.profile import (FIELDS, HardwareProfile, cached_profile, load_profile, measure, profile_from_dict,
                             save_profile, shipped_profiles)

SHIPPED = {"colab-t4", "rtx3060-12g", "rtx4090-24g", "cpu-only"}
# A figure's comment must name its kind of source; "none" marks the device fields of a cpu profile.
SOURCE_WORDS = ("datasheet", "estimate", "assumed", "measured", "published", "none")
FIELD_LINE = re.compile(r"^(\w+)\s*=\s*(.+?)(?:\s+#\s*(.*))?$")
MiB = 1 << 20

VALID = dict(name="x", device="cuda", device_memory="8GiB", host_memory="16GiB", h2d_bandwidth="12GB/s",
             disk_bandwidth="500MB/s", cpu_gflops_1=20.0, cpu_gflops_batch=200.0, device_gflops_1=200.0,
             device_gflops_batch=10000.0, cpu_threads=4, source="test")


def test_the_four_profiles_ship():
    assert set(shipped_profiles()) == SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profile_loads_and_sources_every_figure(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.device == ("cpu" if name == "cpu-only" else "cuda")
    text = (profile_module._shipped_dir() / f"{name}.toml").read_text()
    seen = []
    for line in text.splitlines():
        match = FIELD_LINE.match(line)
        if not match:
            assert not line.strip() or line.startswith("#"), line
            continue
        key, _, comment = match.groups()
        seen.append(key)
        assert comment, f"{name}: {key} has no comment saying where it comes from"
        if key not in ("name", "device", "source"):
            assert any(word in comment.lower() for word in SOURCE_WORDS), f"{name}: {key}: {comment}"
    assert sorted(seen) == sorted(FIELDS)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_round_trip_through_save_and_load(name, tmp_path):
    profile = load_profile(name)
    path = save_profile(profile, tmp_path / "sub" / "saved.toml")
    assert load_profile(path) == profile
    assert [p.name for p in path.parent.iterdir()] == ["saved.toml"]  # no temp file left behind


def test_awkward_strings_round_trip(tmp_path):
    profile = dataclasses.replace(load_profile("cpu-only"), name='q"uo\\te', source="line\nbreak\ttab é 🙂 \x7f")
    assert load_profile(save_profile(profile, tmp_path / "p.toml")) == profile


def test_units_are_parsed():
    profile = profile_from_dict(VALID, "test")
    assert profile.device_memory == 8 << 30 and profile.h2d_bandwidth == 12 * 10**9
    assert profile.disk_bandwidth == 500 * 10**6


@pytest.mark.parametrize("change", [
    dict(device="tpu"),
    dict(host_memory="lots"),
    dict(host_memory="-1GB"),
    dict(h2d_bandwidth="12 parsecs"),
    dict(h2d_bandwidth=0),  # a cuda profile needs its link
    dict(device_gflops_batch=0.0),
    dict(cpu_gflops_1=-3.0),
    dict(cpu_gflops_1="fast"),
    dict(cpu_gflops_1=float("nan")),
    dict(cpu_gflops_batch=10.0),  # below cpu_gflops_1 = 20
    dict(cpu_threads=0),
    dict(cpu_threads=True),
    dict(name=""),
    dict(device="cpu"),  # a cpu profile with device figures
    dict(colour="blue"),  # unknown key
])
def test_bad_values_are_user_errors(change):
    with pytest.raises(OffloadError):
        profile_from_dict({**VALID, **change}, "test")


def test_missing_key_is_named():
    raw = {k: v for k, v in VALID.items() if k != "cpu_threads"}
    with pytest.raises(OffloadError, match="cpu_threads"):
        profile_from_dict(raw, "test")


def test_unknown_name_lists_the_shipped_ones(tmp_path):
    with pytest.raises(OffloadError) as info:
        load_profile("commodore-64")
    assert all(name in str(info.value) for name in SHIPPED)
    with pytest.raises(OffloadError, match="no profile file"):
        load_profile(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(OffloadError, match="not valid TOML"):
        load_profile(broken)


def small_measure(model_dir=None, **options):
    return measure(model_dir, device="cpu", hidden=64, intermediate=128, read_bytes=4 * MiB, batch=16,
                   repeats=3, **options)


def test_measure_on_this_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the disk probe writes its temp file here
    profile = small_measure()
    assert profile.device == "cpu" and profile.cpu_threads >= 1 and profile.host_memory > 0
    assert profile.cpu_gflops_1 > 0 and profile.cpu_gflops_batch >= profile.cpu_gflops_1
    assert profile.disk_bandwidth > 0
    assert profile.device_memory == profile.h2d_bandwidth == 0
    assert profile.device_gflops_1 == profile.device_gflops_batch == 0
    assert "measured here with offload.profile.measure()" in profile.source
    assert list(tmp_path.iterdir()) == []  # the temp file is gone


def test_measure_reads_the_models_shape_and_files(tmp_path):
    # A model directory is all measure() looks at: config.json for the shape, *.safetensors to read.
    import json

    import torch
    from safetensors.torch import save_file

    config = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=320, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  num_local_experts=4, num_experts_per_tok=2, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(MiB // 4)}, tmp_path / "model.safetensors")
    profile = measure(tmp_path, device="cpu", read_bytes=4 * MiB, repeats=2)
    assert "H=32 I=48 float32" in profile.source and str(tmp_path) in profile.source
    assert profile.disk_bandwidth > 0 and profile.cpu_gflops_1 > 0


def test_cached_profile_measures_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_measure(model_dir=None, **options):
        calls.append(model_dir)
        return dataclasses.replace(load_profile("cpu-only"), name="measured-here")

    monkeypatch.setattr(profile_module, "measure", fake_measure)
    first = cached_profile("some/model")
    assert profile_module.cache_path().parent == tmp_path / "moe-offload"
    assert profile_module.cache_path().is_file()
    assert cached_profile("some/model") == first and calls == ["some/model"]
    profile_module.cache_path().write_text("damaged = \n")
    assert cached_profile() == first and len(calls) == 2  # a damaged cache file is measured again


def test_profile_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_profile("colab-t4").cpu_threads = 3
    assert isinstance(load_profile("colab-t4"), HardwareProfile)


def test_cpu_weight_bytes_is_optional_and_checked():
    assert profile_from_dict(VALID, "test").cpu_weight_bytes == 2.0  # profiles written before it still load
    assert profile_from_dict({**VALID, "cpu_weight_bytes": 0.53}, "test").cpu_weight_bytes == 0.53
    for bad in (0, -1.0, "two", float("inf"), True):
        with pytest.raises(OffloadError, match="cpu_weight_bytes"):
            profile_from_dict({**VALID, "cpu_weight_bytes": bad}, "test")


def test_measure_records_the_bytes_its_cpu_kernel_read(tmp_path, monkeypatch):
    """So a profile measured on int4 experts is not sped up by int4's bytes a second time."""
    import torch

    from offload.formats import ExpertFormat

    monkeypatch.chdir(tmp_path)
    assert small_measure().cpu_weight_bytes == 2.0  # bf16
    int4 = small_measure(experts="int4")
    assert int4.cpu_weight_bytes == pytest.approx(ExpertFormat("int4", 64, 128, torch.bfloat16, 32).nbytes
                                                  / (3 * 64 * 128), abs=1e-4)
    assert "int4-g32" in int4.source
