"""Routing logs from other tools (offload import-trace) and damaged traces: usable or one clean error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from offload.cli import main
from offload.errors import OffloadError
from offload.predictors.importer import read_jsonl
from offload.predictors.trace import load_trace


def write_log(path, tokens=60, layers=2, k=2, experts=8, **optional):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for t in range(tokens):
            for layer in range(layers):
                row = {"token": t, "layer": layer, "experts": sorted(rng.choice(experts, k, replace=False).tolist())}
                if "weights" in optional:
                    row["weights"] = [0.7, 0.3][:k]
                if "token_id" in optional:
                    row["token_id"] = int(t % 7)
                if "sequence" in optional:
                    row["sequence"] = t // 20
                f.write(json.dumps(row) + "\n")
    return path


def run(args):
    return CliRunner().invoke(main, args)


def test_a_routing_only_log_imports_and_every_tool_accepts_it(tmp_path):
    log = write_log(tmp_path / "log.jsonl", sequence=True)
    result = run(["import-trace", str(log), "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert "without token ids and router probabilities" in result.output
    trace = load_trace(tmp_path / "t")
    original = read_jsonl(log)
    assert np.array_equal(trace.topk_ids, original.topk_ids) and trace.sequence_starts.tolist() == [0, 20, 40]
    assert not trace.header["has_token_ids"] and (trace.token_ids == -1).all()
    # The k weights stand in for the router distribution: equal shares, on the chosen experts only.
    assert np.allclose(trace.router_probs.sum(-1), 1.0) and (np.count_nonzero(trace.router_probs, -1) == 2).all()
    result = run(["eval-predictor", "--trace", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert "fitted on 30 tokens, scored on 30" in result.output and "n/a" in result.output
    result = run(["simulate", "--trace", str(tmp_path / "t"), "--shape", "mixtral-8x7b", "--profile", "cpu-only",
                  "--tokens", "10"])
    assert result.exit_code == 0, result.output


def test_optional_fields_are_kept(tmp_path):
    trace = read_jsonl(write_log(tmp_path / "log.jsonl", weights=True, token_id=True))
    assert trace.header["has_token_ids"] and trace.token_ids[:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    assert np.allclose(trace.topk_probs[..., 0], 0.7) and len(trace.sequence_starts) == 1


@pytest.mark.parametrize("lines,message", [
    (['{"token": 0, "layer": 0, "experts": [1, 2]}', "not json"], "line 2: not JSON"),
    (['{"token": 0, "layer": 0, "experts": []}'], "non-empty list"),
    (['{"token": 0, "layer": 0, "experts": [1, 2]}', '{"token": 0, "layer": 0, "experts": [1, 2]}'], "repeated"),
    (['{"token": 0, "layer": 0, "experts": [1, 2]}', '{"token": 1, "layer": 0, "experts": [1]}'], "same k"),
    (['{"token": 0, "layer": 0, "experts": [1, 2]}', '{"token": 0, "layer": 1, "experts": [1, 2]}',
      '{"token": 1, "layer": 1, "experts": [1, 2]}'], "first missing: token 1, layer 0"),
    (['{"token": 0, "layer": 0, "experts": [1, 2], "token_id": 3}', '{"token": 1, "layer": 0, "experts": [1, 2]}'],
     "same optional fields"),
    ([], "no rows"),
])
def test_bad_logs_are_one_clean_error(tmp_path, lines, message):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n")
    result = run(["import-trace", str(log), "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t").exists()
    (tmp_path / "latin1.jsonl").write_bytes(b'{"token": 0, "layer": 0, "experts": [1], "x": "\xe9"}\n')
    assert "not UTF-8" in run(["import-trace", str(tmp_path / "latin1.jsonl"), "--out", str(tmp_path / "u")]).output


@pytest.fixture
def trace_dir(tmp_path):
    log = write_log(tmp_path / "log.jsonl", tokens=40, token_id=True)
    run(["import-trace", str(log), "--out", str(tmp_path / "t")])
    return tmp_path / "t"


def test_damaged_traces_are_one_clean_error(trace_dir):
    data = trace_dir / "trace.safetensors"
    tensors = load_file(data)
    bad = dict(tensors, topk_ids=(tensors["topk_ids"] + 100).astype(np.int16))
    save_file(bad, data)
    with pytest.raises(OffloadError, match="fall outside"):
        load_trace(trace_dir)
    save_file({k: v for k, v in tensors.items() if k != "topk_ids"}, data)
    with pytest.raises(OffloadError, match="topk_ids .* is missing"):
        load_trace(trace_dir)
    save_file(tensors, data)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(OffloadError, match="damaged"):
        load_trace(trace_dir)
    (trace_dir / "header.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(OffloadError, match="not UTF-8 JSON"):
        load_trace(trace_dir)


def test_a_one_sequence_trace_splits_by_tokens(trace_dir):
    trace = load_trace(trace_dir)
    fit, test = trace.split(0.25)
    assert (fit.num_tokens, test.num_tokens) == (10, 30) and test.sequence_starts.tolist() == [0]
    for fraction in (0, 1, 5):
        with pytest.raises(OffloadError, match="between 0 and 1"):
            trace.split(fraction)
