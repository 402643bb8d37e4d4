"""`offload plot` and the engine's opt-in timeline recorder: the figure's panels and axes (not its
pixels), a valid PNG written safely, and a timeline that changes nothing when off or on."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import offload
from offload.cli import main
from offload.engine import OffloadedExperts
from offload.errors import OffloadError
from offload.predictors.trace import load_trace

matplotlib = pytest.importorskip("matplotlib")  # the plot extra (also in the test extra)

TRACE = Path(__file__).resolve().parent / "data" / "demo_trace"
PROMPT = [1, 30, 31, 32, 33, 34]
KINDS = {"layer", "compute", "stall", "read", "fetch", "cpu"}


@pytest.fixture(scope="module")
def demo_stats(tmp_path_factory):
    """Stats JSON of an offloaded demo run with a recorded timeline, as `generate --stats-file` writes it."""
    path = tmp_path_factory.mktemp("stats") / "run.json"
    result = CliRunner().invoke(main, ["generate", "-p", "ROMEO:", "-n", "8", "--device", "cpu", "--threads", "1",
                                       "--cpu-memory", "8MiB", "--timeline", "--stats-file", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_stats_file_holds_the_last_decode_steps_timeline(demo_stats):
    stats = json.loads(demo_stats.read_text())
    timeline = stats["timeline"]
    assert timeline["step"] == "decode" and timeline["tokens"] == 1
    events = timeline["events"]
    kinds = {e["kind"] for e in events}
    assert {"layer", "compute"} <= kinds <= KINDS
    assert {e["layer"] for e in events if e["kind"] == "layer"} == {0, 1, 2, 3}  # one step: each layer once
    assert sum(e["kind"] == "layer" for e in events) == 4
    assert all(0 <= e["start"] <= e["end"] for e in events)
    assert [e["start"] for e in events] == sorted(e["start"] for e in events)


def test_figure_has_one_panel_per_view(demo_stats):
    from offload.plot import expert_usage, figure, load_stats

    trace = load_trace(TRACE)
    fig, panels = figure(trace=trace)
    assert panels == ["expert usage"]
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    heat = fig.axes[0].images[0].get_array()
    assert heat.shape == (trace.num_layers, trace.num_experts)
    usage = expert_usage(trace)
    assert usage.sum(axis=1) == pytest.approx([trace.top_k] * trace.num_layers)  # each token picks top_k

    stats = load_stats(demo_stats)
    fig, panels = figure(trace=trace, stats=stats)
    assert panels == ["expert usage", "hit rate per layer", "bytes moved per layer", "decode-step timeline"]
    assert len(fig.axes) == 5
    hit = fig.axes[1]
    assert [round(p.get_height(), 6) for p in hit.patches] == \
        [round(100 * stats["layers"][k]["hit_rate"], 6) for k in sorted(stats["layers"], key=int)]
    assert len(fig.axes[2].patches) == 2 * len(stats["layers"])  # disk and host->device bars per layer

    no_timeline = {k: v for k, v in stats.items() if k != "timeline"}
    fig, panels = figure(stats=no_timeline)
    assert panels == ["hit rate per layer", "bytes moved per layer"] and len(fig.axes) == 2
    with pytest.raises(OffloadError, match="nothing to plot"):
        figure()


def test_plot_command_writes_a_png_and_refuses_to_overwrite(demo_stats, tmp_path):
    import matplotlib.image

    out = tmp_path / "run.png"
    args = ["plot", "--trace", str(TRACE), "--stats", str(demo_stats), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "decode-step timeline" in result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > image.shape[1] > 500  # tall: 4 panels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png"]  # no temp file left

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output
    assert out.read_bytes() == data
    result = CliRunner().invoke(main, ["plot", "--trace", str(TRACE), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert matplotlib.image.imread(out).shape[0] < image.shape[0]  # one panel now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png"]


def test_plot_command_errors(tmp_path, demo_stats):
    runner = CliRunner()
    result = runner.invoke(main, ["plot", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "nothing to plot" in result.output
    result = runner.invoke(main, ["plot", "--trace", str(TRACE), "--out", str(tmp_path / "x.svg")])
    assert result.exit_code == 2 and ".png" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"hits": 3}')
    result = runner.invoke(main, ["plot", "--stats", str(bad), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "not an offload stats JSON" in result.output
    bad.write_text("{not json")
    result = runner.invoke(main, ["plot", "--stats", str(bad), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "cannot read" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_timeline_is_off_by_default_and_changes_no_token(model_dir):
    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    with offload.load(path, device="cpu", cpu_memory=str(6 * 3 * 48 * 32 * 4)) as llm:  # 6 of 24 experts
        assert isinstance(llm.experts, OffloadedExperts)
        plain = llm.generate(PROMPT, max_new_tokens=10).token_ids
        assert llm.experts.events is None and llm.stats.experts.timeline is None
        assert "timeline" not in llm.stats.as_dict()
        llm.record_timeline(True)
        recorded = llm.generate(PROMPT, max_new_tokens=10).token_ids
        assert recorded == plain
        timeline = llm.stats.as_dict()["timeline"]
        assert {e["layer"] for e in timeline["events"]} <= set(llm.config.moe_layers)
        assert any(e["kind"] == "read" for e in timeline["events"])  # 6 slots for 3 layers of top-2: misses
        llm.record_timeline(False)
        assert llm.experts.events is None
    with offload.load(path, device="cpu") as llm:  # resident: nothing is fetched, so no timeline
        with pytest.raises(OffloadError, match="resident"):
            llm.record_timeline(True)


def test_timeline_of_the_tiered_engine_shows_copies_and_cpu_experts(model_dir):
    """The host tier between disk and compute slots (a GPU's layout, run on the CPU as tests/test_hybrid.py
    does): fetches are disk reads then copies, and experts the scheduler sends to the CPU run there."""
    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    llm = offload.load(path, device="cpu")
    expected = llm.generate(PROMPT, max_new_tokens=8).token_ids
    placement = dataclasses.replace(llm.placement, mode="offloaded", device_slots=6, host_slots=24)
    engine = OffloadedExperts(llm.checkpoint, placement, llm.device, llm.expert_format, "lru", "layer",
                              llm.stats.experts, decide=lambda work: {w.expert: "cpu" if w.expert % 2 else "fetch"
                                                                       for w in work})
    llm.model.set_executor(engine)
    llm.experts = engine
    try:
        engine.record_timeline(True)
        assert llm.generate(PROMPT, max_new_tokens=8).token_ids == expected
        kinds = {e["kind"] for e in llm.stats.as_dict()["timeline"]["events"]}
        assert kinds <= KINDS and {"layer", "compute"} <= kinds
        # over the whole run, every kind of span shows up in some decode step
        seen = set()
        engine.stats.timeline = None
        for _ in range(3):
            llm.generate([1, 40 + _, 41, 42], max_new_tokens=6)
            seen |= {e.kind for e in engine.stats.timeline.events}
        assert {"fetch", "cpu"} <= seen
    finally:
        llm.close()
