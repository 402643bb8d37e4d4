"""Demand reads first (cache/priority.py): a guess reads in chunks, each waiting while a demand
read runs; promoted it goes on as a demand read, cancelled it stops before its next chunk; in the
engine wrong guesses leave the cache, their bytes counted as read, and the outputs stay exact."""

import threading
import time

import numpy as np
import pytest
import torch

import offload
import offload.cache.store as store
from offload.cache.priority import Cancelled, ReadGate
from offload.cache.store import ExpertReader, safetensors_extents

PROMPT = [1, 30, 31, 32, 33, 34]


def run_in_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def test_a_guess_waits_while_a_demand_read_runs_and_goes_when_none_does():
    gate = ReadGate()
    ticket = gate.ticket()
    ticket.proceed()  # no demand read: goes at once
    gate.begin_demand()
    t, out = run_in_thread(ticket.proceed)
    t.join(0.2)
    assert t.is_alive()  # waiting for the demand read
    gate.end_demand()
    t.join(2)
    assert not t.is_alive() and "error" not in out


def test_a_promoted_guess_goes_beside_demand_reads_and_a_cancelled_one_stops():
    gate = ReadGate()
    gate.begin_demand()
    right, wrong = gate.ticket(), gate.ticket()
    t1, out1 = run_in_thread(right.proceed)
    t2, out2 = run_in_thread(wrong.proceed)
    t1.join(0.1)
    assert t1.is_alive() and t2.is_alive()
    right.promote()
    wrong.cancel()
    t1.join(2)
    t2.join(2)
    assert "error" not in out1 and isinstance(out2.get("error"), Cancelled)
    wrong.promote()  # too late: a cancelled guess stays cancelled...
    with pytest.raises(Cancelled):
        wrong.proceed()
    right.cancel()  # ...and a promoted one is a demand read
    right.proceed()
    gate.end_demand()


def expert_file(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 255, (3, 4096), dtype=torch.uint8, generator=g)
    path = tmp_path / "experts.safetensors"
    save_file({"experts": weight}, str(path))
    extent = safetensors_extents(path)["experts"]
    return path, extent, weight


def test_a_guess_reads_in_chunks_the_same_bytes_and_stops_where_cancelled(tmp_path, monkeypatch):
    path, extent, weight = expert_file(tmp_path)
    monkeypatch.setattr(store, "CHUNK", 1000)
    reader = ExpertReader(lambda layer, expert: (extent.row(expert),), [path])
    sizes = []
    real = store.os.preadv
    monkeypatch.setattr(store.os, "preadv", lambda fd, bufs, off: sizes.append(sum(map(len, bufs))) or real(fd, bufs, off))
    out = torch.zeros(4096, dtype=torch.uint8)
    ticket = ReadGate().ticket()
    assert reader.read(0, 1, [out], ticket) == 4096 and torch.equal(out, weight[1])
    assert sizes == [1000, 1000, 1000, 1000, 96] and ticket.bytes == 4096

    gate = ReadGate()
    ticket, calls = gate.ticket(), []

    def proceed():  # cancelled after two chunks
        calls.append(1)
        if len(calls) == 3:
            ticket.cancel()
        type(ticket).proceed(ticket)

    ticket.proceed = proceed
    with pytest.raises(Cancelled):
        reader.read(0, 2, [torch.zeros(4096, dtype=torch.uint8)], ticket)
    assert ticket.bytes == 2000
    reader.close()


@pytest.fixture
def slow_disk(monkeypatch):
    """Every pread takes 3 ms and a guess reads 4 KB chunks: guesses are mid-read when their layer starts."""
    real = store.os.preadv
    monkeypatch.setattr(store, "CHUNK", 4096)

    def preadv(fd, bufs, offset):
        time.sleep(0.003)
        return real(fd, bufs, offset)

    monkeypatch.setattr(store.os, "preadv", preadv)


def test_wrong_guesses_are_cancelled_leave_the_cache_and_count_only_the_bytes_they_read(model_dir, slow_disk):
    from offload.predictors.base import Predictor
    from offload.prefetch import Prefetcher

    class Wrong(Predictor):  # always experts 0 and 1: mostly wrong
        def scores(self, pos, hidden, token_ids, chosen):
            return {pos + 1: -np.asarray(chosen.shape[0] * [np.arange(8.0)])} if pos + 1 < 4 else {}

    path = model_dir("mixtral", num_hidden_layers=4, num_local_experts=8)
    resident = offload.load(path, device="cpu")
    expected = resident.generate(PROMPT, max_new_tokens=12).token_ids
    per_expert = resident.placement.expert_bytes
    llm = offload.load(path, device="cpu", cpu_memory=16 * per_expert, predictor="gate")
    engine = llm.experts
    assert engine.yielding
    engine.prefetch = Prefetcher(Wrong(), top_k=2, limit=2, threshold=0.0)  # the precision rule, never off
    read = []
    real = engine.reader.read
    engine.reader.read = lambda *a: read.append(real(*a)) or read[-1]  # whole reads only (cancelled ones raise)
    assert llm.generate(PROMPT, max_new_tokens=12).token_ids == expected
    s = llm.stats
    assert s.prefetch_issued > 0 and s.prefetch_cancelled > 0
    # What was counted is what was read: whole experts, plus the chunks the cancelled guesses read.
    total = sum(c.bytes_from_disk for c in s.experts.layers.values())
    assert sum(read) < total < sum(read) + s.prefetch_cancelled * per_expert
    for key in list(engine.prefetching):  # guesses for a step that never came: let them end
        engine._finish_prefetch(key)
    for layer in engine.layers:  # no cancelled (partly read) expert left in the cache
        for e in range(8):
            if (layer, e) in engine.cache:
                held = engine.pool[engine.cache.lookup((layer, e))]
                assert all(torch.equal(a, b) for a, b in zip(held, _expert(engine, layer, e)))
    llm.close()


def _expert(engine, layer, expert):
    """The expert's tensors as a fresh, unhurried read gives them."""
    buf = torch.empty_like(engine.pool.data[0])
    store.ExpertReader.read(engine.reader, layer, expert, engine.pool.fmt.read_targets(buf))
    return engine.pool.fmt.views(buf)


def test_right_guesses_are_promoted_and_the_outputs_stay_exact(model_dir, slow_disk):
    from offload.predictors.base import Predictor
    from offload.prefetch import Prefetcher

    path = model_dir("mixtral", num_hidden_layers=4, num_local_experts=8)
    resident = offload.load(path, device="cpu")
    expected = resident.generate(PROMPT, max_new_tokens=12).token_ids
    routing = []  # each layer step's chosen experts, from a first offloaded run
    llm = offload.load(path, device="cpu", cpu_memory=16 * resident.placement.expert_bytes, predictor="gate")

    class Oracle(Predictor):  # replays the next layer's routing as it was (the same greedy run)
        def __init__(self):
            self.step = 0

        def scores(self, pos, hidden, token_ids, chosen):
            self.step += 1
            if pos + 1 >= 4 or self.step >= len(routing):
                return {}
            s = np.zeros((chosen.shape[0], 8))
            s[:, sorted(set(routing[self.step].reshape(-1).tolist()))] = 1.0
            return {pos + 1: s}

    real = llm.experts._read_routing
    llm.experts._read_routing = lambda ids, probs: routing.append(real(ids, probs)[0]) or (routing[-1], None)
    llm.generate(PROMPT, max_new_tokens=12)
    llm.close()

    llm = offload.load(path, device="cpu", cpu_memory=16 * resident.placement.expert_bytes, predictor="gate")
    llm.experts.prefetch = Prefetcher(Oracle(), top_k=2, limit=2, threshold=0.0)
    promoted = []
    judge = llm.experts._judge_guesses

    def counting(layer, requested):
        promoted.extend(k for k, t in llm.experts.tickets.items() if k[0] == layer and k[1] in requested)
        judge(layer, requested)

    llm.experts._judge_guesses = counting
    assert llm.generate(PROMPT, max_new_tokens=12).token_ids == expected
    assert promoted and llm.stats.prefetch_used > 0
    llm.close()


def test_a_live_run_measures_prefetching_against_none_and_stays_exact(model_dir, monkeypatch):
    """offload.load on a CPU (prediction timed, as outside the tests): decode steps alternate between
    prefetching and not, both timed; the tokens are the resident run's either way."""
    import offload.prefetch

    monkeypatch.setattr(offload.prefetch, "TIMED", True)
    path = model_dir("mixtral", num_hidden_layers=4, num_local_experts=8)
    resident = offload.load(path, device="cpu")
    expected = resident.generate(PROMPT, max_new_tokens=60).token_ids
    llm = offload.load(path, device="cpu", cpu_memory=16 * resident.placement.expert_bytes, predictor="routing")
    trial = llm.experts.prefetch.trial
    assert trial is not None and llm.experts.prefetch.timed
    assert llm.generate(PROMPT, max_new_tokens=60).token_ids == expected
    assert len(trial.times[True]) >= 16 and len(trial.times[False]) >= 16
    llm.close()


def test_a_failed_step_leaves_no_demand_read_counted(model_dir):
    """A demand counted but never ended (Ctrl-C between counting and submitting, or a failed step)
    would hold every later guess back for good: recovery clears the count."""
    path = model_dir("mixtral", num_hidden_layers=4, num_local_experts=8)
    resident = offload.load(path, device="cpu")
    expected = resident.generate(PROMPT, max_new_tokens=8).token_ids
    llm = offload.load(path, device="cpu", cpu_memory=16 * resident.placement.expert_bytes, predictor="gate")
    engine = llm.experts
    engine.gate.begin_demand()  # as if interrupted right after counting a demand read
    real, calls = engine.reader.read, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated I/O error")
        return real(*args)

    engine.reader.read = failing
    with pytest.raises(offload.OffloadError, match="simulated I/O error"):
        llm.generate(PROMPT, max_new_tokens=8)
    assert engine.gate.demand == 0
    assert llm.generate(PROMPT, max_new_tokens=8).token_ids == expected
    llm.close()
