"""`offload bench` across expert formats, without timing anything: the /proc figures, the per-format
budgets, the case plan and its ratios, the engine settings forced in a child, and the kernels'
faster int4 dequantization (same bits as offload/quant.py's)."""

from dataclasses import replace
import os
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import offload
from offload import bench
from offload.bench import Case, CaseResult
from offload.errors import OffloadError
from offload.formats import ExpertFormat
from offload.kernels import dequantize, expert_kernel

DEMO = os.path.join(os.path.dirname(offload.__file__), "demo_model")


# ---- /proc parsing -------------------------------------------------------------------------------

def test_parse_proc_io():
    text = ("rchar: 323934931\nwchar: 323929600\nsyscr: 632687\nsyscw: 632675\nread_bytes: 1220608\n"
            "write_bytes: 323932160\ncancelled_write_bytes: 0\n")
    io = bench.parse_proc_io(text)
    assert io["read_bytes"] == 1220608 and io["rchar"] == 323934931 and io["cancelled_write_bytes"] == 0


def test_process_read_bytes_reads_this_process_and_tolerates_a_missing_file(tmp_path):
    assert bench.process_read_bytes() >= 0
    assert bench.process_read_bytes(str(tmp_path / "absent")) == 0
    (tmp_path / "io").write_text("rchar: 5\nread_bytes: 8192\n")
    assert bench.process_read_bytes(str(tmp_path / "io")) == 8192


def test_parse_schedstat():
    assert bench.parse_schedstat("1208542153 67280417 3190\n") == (1208542153, 67280417)


def test_schedstat_delta_counts_new_threads_from_zero_and_loses_ended_ones():
    before = {1: (100, 10), 2: (50, 5), 3: (70, 7)}  # thread 3 ends in between
    after = {1: (160, 30), 2: (50, 5), 4: (40, 25)}  # thread 4 is born in between
    assert bench.schedstat_delta(before, after) == (60 + 0 + 40, 20 + 0 + 25)


def test_thread_schedstats_sees_every_thread_of_this_process(tmp_path):
    if not os.path.exists(f"/proc/self/task/{os.getpid()}/schedstat"):
        pytest.skip("this kernel keeps no schedstats")
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        stats = bench.thread_schedstats()
        assert os.getpid() in stats and worker.native_id in stats
        assert all(cpu >= 0 and wait >= 0 for cpu, wait in stats.values())
    finally:
        stop.set()
        worker.join()
    # a fake /proc/<pid>/task tree: unreadable entries are skipped
    for tid, text in (("11", "5 6 7\n"), ("12", "")):
        (tmp_path / tid).mkdir()
        (tmp_path / tid / "schedstat").write_text(text)
    (tmp_path / "13").mkdir()
    assert bench.thread_schedstats(str(tmp_path)) == {11: (5, 6)}
    assert bench.thread_schedstats(str(tmp_path / "absent")) == {}


def test_probe_reports_shares_over_wall_time():
    probe = bench.Probe()
    sum(i * i for i in range(20000))
    seen = probe.stop()
    assert set(seen) == {"process_read_bytes", "wall_seconds", "on_cpu_seconds", "runqueue_wait_seconds",
                         "major_faults"}
    assert seen["wall_seconds"] > 0 and seen["process_read_bytes"] >= 0 and seen["runqueue_wait_seconds"] >= 0


# ---- options --------------------------------------------------------------------------------------

def test_option_lists():
    assert bench.parse_list(" bf16, int8,,int4 ") == ("bf16", "int8", "int4")
    assert bench.parse_list(None) == ()
    assert bench.parse_cases("A,c") == ("a", "c")
    assert bench.parse_io_threads("1,2,4") == (1, 2, 4)
    assert bench.parse_io_threads("auto") == bench.parse_io_threads("") == (None,)
    assert bench.parse_page_cache("auto,off,on,fadvise") == (None, False, True, "fadvise")
    assert bench.parse_readahead("") == (None,) and bench.parse_readahead("on,off") == (True, False)
    for parse, bad in ((bench.parse_cases, "a,d"), (bench.parse_cases, ""), (bench.parse_io_threads, "0"),
                       (bench.parse_io_threads, "two"), (bench.parse_page_cache, "maybe"),
                       (bench.parse_readahead, "no")):
        with pytest.raises(OffloadError):
            parse(bad)


def test_cli_rejects_a_bad_case_list_before_running_anything():
    from offload.cli import main

    out = CliRunner().invoke(main, ["bench", DEMO, "--cases", "a,x"])
    assert out.exit_code == 2 and "cases" in out.output


# ---- budgets and the plan --------------------------------------------------------------------------

def test_case_budgets_count_the_format_bytes():
    cfg = SimpleNamespace(sparse_layers=[True] * 12, num_experts=8, top_k=2)
    dense, int4 = (bench.case_budgets(cfg, eb, 1000, "cpu") for eb in (22_020_096, 6_881_280))
    assert dense["total"] == int4["total"] == 96
    assert dense["b"]["cpu_memory"] == 48 * 22_020_096 and int4["b"]["cpu_memory"] == 48 * 6_881_280
    assert dense["c"]["cpu_memory"] == 24 * 22_020_096 and int4["c"]["cpu_memory"] == 24 * 6_881_280
    assert int4["limit"] == 1000 + 24 * 6_881_280 + bench.RUNTIME_OVERHEAD
    assert bench.case_budgets(cfg, 100, 0, "cpu", cgroups=False)["limit"] is None
    tiny = SimpleNamespace(sparse_layers=[True] * 2, num_experts=4, top_k=2)
    assert bench.case_budgets(tiny, 10, 0, "cpu")["c"]["cpu_memory"] == 2 * 2 * 10  # at least top_k per layer
    gpu = bench.case_budgets(cfg, 10, 1000, "cuda")
    assert gpu["b"] == dict(device="cuda", gpu_memory=1000 + 480, cpu_memory=960)


@pytest.fixture(scope="module")
def int4_demo(tmp_path_factory):
    """(directory, format name, experts option) of the demo model quantized to int4, in a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("MOE_OFFLOAD_CACHE")
    os.environ["MOE_OFFLOAD_CACHE"] = str(cache)
    try:
        yield bench.format_directory(DEMO, "int4")
    finally:
        if saved is None:
            os.environ.pop("MOE_OFFLOAD_CACHE", None)
        else:
            os.environ["MOE_OFFLOAD_CACHE"] = saved


def test_format_directory(int4_demo):
    path, name, option = int4_demo
    assert name == option == "int4-g32" and (path / "config.json").is_file() and str(path) != DEMO
    assert bench.format_directory(DEMO, None)[1:] == ("fp32", None)  # as stored
    assert bench.format_directory(DEMO, "fp32")[1:] == ("fp32", "fp32")
    assert bench.format_directory(str(path), None)[1:] == ("int4-g32", "int4-g32")  # a quantized dir as stored


def test_default_cases_per_format(int4_demo):
    from offload.checkpoint import Checkpoint

    path, name, option = int4_demo
    cases, info = bench.default_cases(str(path), "cpu", ("none",), option, io_threads=(1, None),
                                      page_cache=(None, False), fmt_name=name)
    cfg = Checkpoint(path).config
    fmt = ExpertFormat("int4", cfg.hidden_size, cfg.moe_intermediate_size, torch.float32, 32)
    assert info["expert_bytes"] == fmt.nbytes
    assert info["budgets"]["c"] == max(info["total_experts"] // 4, 4 * cfg.top_k) * fmt.nbytes
    assert [c.name for c in cases] == [
        "a: resident", "b: RAM cache 1/2, page cache, none", "c: RAM 1/4, disk (cgroup), none, io 1",
        "c: RAM 1/4, disk (cgroup), none, io 1, drop off", "c: RAM 1/4, disk (cgroup), none",
        "c: RAM 1/4, disk (cgroup), none, drop off"]
    assert all(c.model == str(path) and c.format == name and c.options["experts"] == option for c in cases)
    assert [(c.io_threads, c.drop_page_cache) for c in cases[2:]] == [(1, None), (1, False), (None, None),
                                                                       (None, False)]
    only_c, _ = bench.default_cases(str(path), "cpu", ("none", "gate"), option, cases=("c",), fmt_name=name,
                                    threads=1, readahead=(False,))
    assert [c.options["predictor"] for c in only_c] == ["none", "gate"] and all(c.cold for c in only_c)
    assert [c.name for c in only_c] == ["c: RAM 1/4, disk (cgroup), none, readahead off",
                                        "c: RAM 1/4, disk (cgroup), gate, readahead off"]
    assert all(c.readahead is False and c.options["threads"] == 1 for c in only_c)
    dense, _ = bench.default_cases(DEMO, "cpu", ("none",), None, cases=("a",), fmt_name="fp32")
    assert "experts" not in dense[0].options


def test_interleave_runs_formats_case_by_case():
    per_format = [[Case(n, {}, format=f) for n in ("a", "b", "c")] for f in ("bf16", "int4")]
    per_format[1].append(Case("d", {}, format="int4"))
    assert [(c.name, c.format) for c in bench.interleave(per_format)] == [
        ("a", "bf16"), ("a", "int4"), ("b", "bf16"), ("b", "int4"), ("c", "bf16"), ("c", "int4"), ("d", "int4")]


def _result(name, fmt, tps, counted=0.0, read=0.0):
    return CaseResult(name=name, placement="", load_seconds=0, tokens_per_second=tps, time_to_first_token=0,
                      hit_rate=0, bytes_from_disk_per_token=counted, bytes_to_device_per_token=0,
                      misses_per_token=0, stall_seconds_per_token=0, peak_rss=0, baseline_rss=0, format=fmt,
                      process_read_bytes_per_token=read)


def test_merge_takes_medians_over_rounds():
    rounds = [_result("c", "int4", tps, counted=c) for tps, c in ((3.0, 10.0), (5.0, 30.0), (4.0, 20.0))]
    for r, rss, runs in zip(rounds, (100, 300, 200), ([1], [2], [3])):
        r.peak_rss, r.runs = rss, runs
    merged = bench.merge(rounds)
    assert (merged.tokens_per_second, merged.bytes_from_disk_per_token, merged.peak_rss) == (4.0, 20.0, 300)
    assert merged.runs == [1, 2, 3] and merged.name == "c" and merged.format == "int4"
    assert bench.merge(rounds[:1]) is rounds[0]


def test_ratios_to_own_resident_and_to_the_reference_format():
    results = [_result("a: resident", "bf16", 10), _result("a: resident", "int4", 25),
               _result("c", "bf16", 2), _result("c", "int4", 7), _result("c, io 1", "int4", 5)]
    assert bench.ratios(results) == [(1.0, 1.0), (1.0, 2.5), (0.2, 1.0), (0.28, 3.5), (0.2, None)]
    assert bench.ratios([_result("c", "int4", 3)]) == [(None, 1.0)]
    assert bench.read_over_counted(_result("c", "bf16", 1, counted=100.0, read=130.0)) == pytest.approx(1.3)
    assert bench.read_over_counted(_result("a", "bf16", 1)) is None
    lines = []
    bench.report(results, echo=lines.append)
    assert any("x bf16" in line for line in lines) and any("3.50" in line for line in lines)


# ---- one case, in process -------------------------------------------------------------------------

def test_forced_engine_settings_and_the_figures_of_a_case(monkeypatch):
    from offload import api

    monkeypatch.setattr(api, "OffloadedExperts", api.OffloadedExperts)  # restored afterwards
    case = Case("c", dict(device="cpu", cpu_memory="6MiB", predictor="none"), io_threads=1,
                drop_page_cache=True, readahead=False, format="fp32")
    result = bench.run_case(DEMO, case, prompt_tokens=4, new_tokens=2, repeats=1)
    assert (result.io_threads, result.drop_page_cache, result.format) == (1, True, "fp32")
    fadvise = bench.run_case(DEMO, replace(case, drop_page_cache="fadvise"), prompt_tokens=4, new_tokens=2, repeats=1)
    assert fadvise.drop_page_cache and not fadvise.direct_io  # buffered reads, pages dropped
    assert result.cpu_seconds_per_token > 0 and result.major_faults_per_token >= 0
    assert result.bytes_from_disk_per_token > 0 and result.process_read_bytes_per_token >= 0
    assert result.runqueue_wait_share >= 0 and result.on_cpu_share >= 0
    assert {"process_read_bytes", "wall_seconds", "runqueue_wait_seconds"} <= set(result.runs[0])
    resident = bench.run_case(DEMO, Case("a", dict(device="cpu"), format="fp32"), 4, 2, 1)
    assert (resident.io_threads, resident.drop_page_cache) == (0, False)


# ---- the kernels' int4 dequantization ---------------------------------------------------------------

@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fast_int4_dequantize_is_bit_identical(group, dtype):
    h, i = 256, 384
    gen = torch.Generator().manual_seed(group)
    gate, up, down = (torch.randn(*s, generator=gen) * 0.05 for s in ((i, h), (i, h), (h, i)))
    fmt = ExpertFormat("int4", h, i, dtype, group)
    packed = fmt.views(fmt.quantize(gate, up, down))
    for mine, ref in zip(dequantize(fmt, packed, dtype), fmt.dequantize(packed, dtype)):
        assert mine.shape == ref.shape and mine.dtype == ref.dtype and torch.equal(mine, ref)


def test_dequantize_path_of_the_kernel_uses_it(monkeypatch):
    import offload.kernels as kernels

    h, i = 128, 192
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(*s, generator=gen) * 0.05 for s in ((i, h), (i, h), (h, i)))
    fmt = ExpertFormat("int4", h, i, torch.float32, 32)
    packed = fmt.views(fmt.quantize(gate, up, down))
    x = torch.randn(5, h, generator=gen)
    monkeypatch.setattr(kernels, "DEQUANT_TOKENS", 1)
    y = expert_kernel(fmt, torch.device("cpu"), F.silu)(x, packed)
    wgu, wd = fmt.dequantize(packed, torch.float32)
    g, u = F.linear(x, wgu).chunk(2, dim=-1)
    assert torch.allclose(y, F.linear(F.silu(g) * u, wd), rtol=1e-5, atol=1e-6)


def test_io_pool_follows_the_cores_this_process_may_use():
    from offload.cache.store import IO_THREADS

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert IO_THREADS == min(4, max(2, cores))


def test_dequant_threshold_per_format_or_one_for_all(monkeypatch):
    import offload.kernels as kernels

    assert kernels.dequant_tokens("int8") < kernels.dequant_tokens("int4")
    assert kernels.dequant_tokens("mxfp4") == 0  # no weight-only kernel: always dequantized
    monkeypatch.setattr(kernels, "DEQUANT_TOKENS", 1)
    assert kernels.dequant_tokens("int8") == kernels.dequant_tokens("int4") == 1


def test_rounds_alternate_the_order_of_the_cases(monkeypatch):
    """Round 2 runs the cases in reverse: a disk that slows down as it reads favours no case."""
    ran = []

    def fake_child(model, case, *args):
        ran.append(case.name.split(":")[0])
        return _result(case.name, case.format, 1.0)

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "read_bandwidth", lambda files, **kw: 1e9)
    monkeypatch.setattr(bench, "drop_from_page_cache", lambda files: None)
    results = bench.bench(DEMO, predictors=("none",), cases=("a", "b", "c"), rounds=3, echo=lambda *a: None)
    assert ran == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert [r.name.split(":")[0] for r in results] == ["a", "b", "c"]  # merged per case, in the planned order
