"""What a new user tripped over: --stop escapes, memory sizes, the profile's temp file, an ignored
--gpu-memory, where --stats goes, and progress bars on long steps."""

import io
import json
import os
import tempfile

import pytest
from click.testing import CliRunner

import offload
import offload.api
from offload.cli import _unescape, main
from offload.config import parse_memory
from offload.errors import OffloadError


def test_stop_values_read_backslash_escapes():
    assert _unescape(None, None, ("\\n\\n", "a\\tb", "c\\\\n", "\\x", "plain")) == \
        ("\n\n", "a\tb", "c\\n", "\\x", "plain")


def test_generate_stops_at_a_blank_line_given_as_backslash_n():
    base = ["generate", "-p", "ROMEO:", "-n", "48", "--device", "cpu", "--threads", "1"]
    full = CliRunner().invoke(main, base)
    assert full.exit_code == 0, full.output
    text = full.stdout
    assert "\n\n" in text.rstrip("\n")  # the demo model writes speeches separated by blank lines
    cut = CliRunner().invoke(main, [*base, "--stop", "\\n\\n"])  # what bash passes for "\n\n"
    assert cut.exit_code == 0, cut.output
    assert cut.stdout == text[:text.index("\n\n")] + "\n"


@pytest.mark.parametrize("value, expected", [
    ("4194304", 4194304), (4194304, 4194304), ("512B", 512), ("4KiB", 4096), ("1.5MiB", 3 << 19),
    ("6GiB", 6 << 30), ("2TiB", 2 << 40), ("8KB", 8000), ("500MB", 500 * 10**6), ("16GB", 16 * 10**9),
    ("1TB", 10**12), ("4 gib", 4 << 30), (" 12mib ", 12 << 20),
])
def test_memory_sizes(value, expected):
    assert parse_memory(value, "cpu_memory") == expected


@pytest.mark.parametrize("value", ["4G", "lots", "", "-1", "1e9", "0", 0, True, 1.5, "GiB"])
def test_memory_sizes_refused(value):
    with pytest.raises(OffloadError, match="cpu_memory"):
        parse_memory(value, "cpu_memory")


def test_cpu_memory_as_a_plain_number_of_bytes_on_the_command_line():
    result = CliRunner().invoke(main, ["generate", "-p", "ROMEO:", "-n", "2", "--device", "cpu", "--threads", "1",
                                       "--cpu-memory", str(8 << 20)])
    assert result.exit_code == 0, result.output
    assert "RAM cache (7.88 MiB)" in result.stderr


def test_profile_temp_file_goes_to_the_temp_dir_and_is_removed(tmp_path, monkeypatch):
    from offload import profile

    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    monkeypatch.chdir(tmp_path)
    seen = []
    real = profile.__dict__.get("read_bandwidth")  # imported inside _disk_bandwidth, from cache.store
    assert real is None
    import offload.cache.store as store

    original = store.read_bandwidth

    def spy(files, **kw):
        seen.extend(files)
        return original(files, **kw)

    monkeypatch.setattr(store, "read_bandwidth", spy)
    rate, text = profile._disk_bandwidth(None, 2 << 20)
    assert rate > 0 and f"a temp file in {where}" in text
    assert seen and all(f.parent == where for f in seen)
    assert list(where.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]

    other = tmp_path / "other"
    other.mkdir()
    profile._disk_bandwidth(None, 1 << 20, tmp_dir=other)
    assert seen[-1].parent == other and list(other.iterdir()) == []

    def interrupted(files, **kw):
        assert files[0].exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "read_bandwidth", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile._disk_bandwidth(None, 1 << 20)
    assert list(where.iterdir()) == []  # Ctrl-C left nothing behind


def test_a_temp_dir_in_ram_is_named_so(tmp_path):
    from offload.profile import in_memory_fs

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\ntmpfs /tmpx tmpfs rw 0 0\n"
                      "/dev/sdb1 /tmp/disk ext4 rw 0 0\n")
    assert in_memory_fs("/tmp", mounts) and in_memory_fs("/tmp/a/b", mounts)
    assert not in_memory_fs("/tmp/disk/a", mounts) and not in_memory_fs("/tm", mounts)
    assert not in_memory_fs("/home", mounts) and not in_memory_fs("/tmp", tmp_path / "absent")


def test_profile_command_says_where_the_temp_file_goes(tmp_path, monkeypatch):
    from offload import profile

    calls = []
    monkeypatch.setattr(profile, "measure", lambda model, **kw: calls.append((model, kw)) or
                        profile.load_profile("cpu-only"))
    result = CliRunner().invoke(main, ["profile", "--tmp-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"512 MiB temporary file in {tmp_path}" in result.stderr
    assert calls == [(None, {"device": "auto", "tmp_dir": str(tmp_path)})]
    result = CliRunner().invoke(main, ["profile"])
    assert result.exit_code == 0 and f"temporary file in {tempfile.gettempdir()}" in result.stderr


def test_gpu_memory_on_a_cpu_run_is_said_to_be_ignored():
    with pytest.warns(UserWarning, match="gpu_memory=1.00 GiB is ignored"):
        offload.load(None, device="cpu", gpu_memory="1GiB").close()
    result = CliRunner().invoke(main, ["generate", "-p", "ROMEO:", "-n", "2", "--device", "cpu", "--threads", "1",
                                       "--gpu-memory", "1GiB"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "gpu_memory" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: gpu_memory=1.00 GiB is ignored")


def test_stats_json_goes_to_stderr_in_generate_and_chat(tmp_path):
    result = CliRunner().invoke(main, ["generate", "-p", "ROMEO:", "-n", "3", "--device", "cpu", "--threads", "1",
                                       "--stats", "--stats-file", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert '"new_tokens"' in result.stderr and '"new_tokens"' not in result.stdout
    assert json.loads((tmp_path / "s.json").read_text())["new_tokens"] == 3
    assert "timeline" not in json.loads((tmp_path / "s.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    result = CliRunner().invoke(main, ["chat", "-n", "3", "--device", "cpu", "--threads", "1", "--stats"],
                                input="hello\n/exit\n")
    assert result.exit_code == 0, result.output
    assert '"new_tokens"' in result.stderr and '"new_tokens"' not in result.stdout


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_and_for_large_checkpoints(monkeypatch, tmp_path):
    from offload.predictors.learned import LearnedPredictor

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bars = []
    real = offload.api._bar
    monkeypatch.setattr(offload.api, "_bar", lambda *a, **kw: bars.append(real(*a, **kw)) or bars[-1])
    offload.load(None, device="cpu").close()  # 28 MiB: under PROGRESS_BYTES, no bar
    assert terminal.getvalue() == "" and bars[-1].disable
    monkeypatch.setattr(offload.api, "PROGRESS_BYTES", 0)
    offload.load(None, device="cpu").close()  # resident: the weights, then the experts
    assert "loading demo_model" in terminal.getvalue()
    resident = bars[-1]
    assert resident.n == resident.total > 20 << 20  # every byte counted, once
    offload.load(None, device="cpu", cpu_memory="8MiB").close()  # offloaded: the resident weights only
    assert bars[-1].n == bars[-1].total < 7 << 20 and terminal.getvalue().count("loading demo_model") >= 2

    terminal.seek(0)
    terminal.truncate()
    with offload.load(None, device="cpu") as llm:
        trace = llm.trace(["ROMEO: hello there", "JULIET: and you"], hidden=True, progress=True)
    assert "tracing" in terminal.getvalue() and "token" in terminal.getvalue()
    LearnedPredictor.train(trace, epochs=2, progress=True)
    assert "training the predictor" in terminal.getvalue()

    not_a_terminal = io.StringIO()
    monkeypatch.setattr("sys.stderr", not_a_terminal)
    offload.load(None, device="cpu").close()
    LearnedPredictor.train(trace, epochs=2, progress=True)
    assert not_a_terminal.getvalue() == ""
    assert os.environ.get("TQDM_DISABLE") is None


def test_bench_table_header_and_notes_on_figures_above_their_bounds():
    from offload import bench
    from offload.bench import CaseResult

    def result(name, tps, counted=0.0, read=0.0):
        return CaseResult(name=name, placement="", load_seconds=0, tokens_per_second=tps, time_to_first_token=0,
                          hit_rate=0, bytes_from_disk_per_token=counted, bytes_to_device_per_token=0,
                          misses_per_token=0, stall_seconds_per_token=0, peak_rss=3 << 30, baseline_rss=1 << 30,
                          format="bf16", process_read_bytes_per_token=read)

    results = [result("a: resident", 10.0), result("b: RAM cache 1/2", 12.0, counted=1e6, read=1e6),
               result("c: RAM 1/4, disk", 8.0, counted=200e6, read=1e6), result("c: slow", 2.0, 100e6, 100e6)]
    lines = []
    bench.report(results, echo=lines.append)
    header = next(line for line in lines if line.startswith("case"))
    assert header.split()[-3:] == ["RSS", "RSS", "added"]  # "peak RSS" and "RSS added": one label a column
    assert "2.00 GiB" in lines[2]
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "b: RAM cache 1/2" in notes[0] and "faster than resident" in notes[0]

    lines = []
    bench.report_bounds(results, warm_bw=1e9, cold_bw=1e9, echo=lines.append)
    bounds = [line for line in lines if line.startswith("bound for")]
    assert len(bounds) == 3  # b, c, c: slow
    notes = [line.strip() for line in lines if "note:" in line]
    assert len(notes) == 2  # b (above the compute bound) and c (reads from the page cache); not "c: slow"
    assert "page cache" in notes[1] and "MB read/tok" in notes[1]
    assert "resident run" in notes[0]


def test_gpu_bench_bounds_count_the_copies_to_the_device():
    """On a GPU the bound of an offloaded case is its slowest path: here 100 MB/token over a 10 GB/s
    link (10 ms) beside 20 MB/token from the page cache at 10 GB/s (2 ms) and 5 ms of compute."""
    from offload import bench
    from offload.bench import CaseResult

    def result(name, tps, disk, link):
        return CaseResult(name=name, placement="", load_seconds=0, tokens_per_second=tps, time_to_first_token=0,
                          hit_rate=0, bytes_from_disk_per_token=disk, bytes_to_device_per_token=link,
                          misses_per_token=0, stall_seconds_per_token=0, peak_rss=0, baseline_rss=0, format="bf16")

    lines = []
    bench.report_bounds([result("a: resident", 200.0, 0, 0), result("b: GPU 1/4", 80.0, 20e6, 100e6)],
                        warm_bw=10e9, cold_bw=None, echo=lines.append, link_bw=10e9)
    (line,) = [line for line in lines if line.startswith("bound for")]
    assert "100.0 MB/token at the host -> device bandwidth = 10.0 ms" in line
    assert "20.0 MB/token at the page-cache copy bandwidth = 2.0 ms" in line
    assert "100.00 with perfect overlap" in line and "(80% of that)" in line
