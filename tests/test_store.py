"""The disk reader puts exactly the checkpoint's bytes into a slot, for every layout, dtype and short read."""

import os

import pytest
import torch
from safetensors import safe_open

from offload.cache.store import ExpertReader, SlotPool
from offload.formats import ExpertFormat
from offload.checkpoint import Checkpoint


def expected(path, family_names, layer, expert, fused):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        if fused:
            gate_up = f.get_tensor(f"model.layers.{layer}.mlp.experts.gate_up_proj")[expert]
            return gate_up, f.get_tensor(f"model.layers.{layer}.mlp.experts.down_proj")[expert]
        base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        gate, up, down = (f.get_tensor(base + n + ".weight") for n in family_names)
        return torch.cat([gate, up]), down


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reader_fills_slots_exactly_even_with_short_reads(model_dir, monkeypatch, fused, dtype):
    path = model_dir("mixtral", fused=fused)
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    real = os.preadv
    calls = []

    def short(fd, buffers, offset):  # the kernel may return fewer bytes than asked
        calls.append(len(buffers))
        first = memoryview(buffers[0])[:1000]
        return real(fd, [first], offset)

    monkeypatch.setattr(os, "preadv", short)
    reader = ExpertReader(ckpt.expert_extents, ckpt.shard_files())
    pool = SlotPool(1, ExpertFormat("dense", cfg.hidden_size, cfg.moe_intermediate_size, dtype), torch.device("cpu"))
    for layer, expert in [(0, 0), (1, 3)]:
        reader.read(layer, expert, pool.targets(0))
        gate_up, down = expected(path, ("w1", "w3", "w2"), layer, expert, fused)
        assert torch.equal(pool[0][0], gate_up.to(dtype)) and torch.equal(pool[0][1], down.to(dtype))
    # Adjacent per-expert tensors in the slot's dtype: one read scattered into three buffers;
    # fused rows (down lies elsewhere) or a dtype conversion: one buffer per read.
    assert max(calls) == (3 if not fused and dtype == torch.float32 else 1)
    reader.close()


def test_read_bandwidth_reads_up_to_the_limit_on_several_threads(tmp_path, monkeypatch):
    import os

    from offload.cache import store

    files = []
    for i, size in enumerate((5000, 12345)):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        files.append(path)
    real = os.preadv
    for threads, limit, expect in ((1, 1 << 20, 17345), (4, 1 << 20, 17345), (3, 9000, 9000)):
        reads = []
        monkeypatch.setattr(store.os, "preadv", lambda fd, bufs, off: reads.append(real(fd, bufs, off)) or reads[-1])
        assert store.read_bandwidth(files, limit=limit, chunk=1024, threads=threads) > 0
        assert sum(reads) == expect  # every byte once, never past the limit


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_reads_give_the_same_bytes_for_every_layout_and_as_a_yielding_guess(model_dir, monkeypatch, fused,
                                                                                   dtype):
    """O_DIRECT reads (pages around the extent into an aligned scratch, a window at a time, copied
    out) at the checkpoint's unaligned offsets, as a demand read or in chunks as a guess: the
    checkpoint's bytes."""
    from offload.cache import store
    from offload.cache.priority import ReadGate

    path = model_dir("mixtral", fused=fused)
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    reader = ExpertReader(ckpt.expert_extents, ckpt.shard_files(), drop_cache=True, direct=True)
    if not reader.direct:
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(store, "CHUNK", 8192)  # several chunks per extent
    monkeypatch.setattr(store, "DIRECT_WINDOW", 16384)  # and several windows per demand read
    pool = SlotPool(1, ExpertFormat("dense", cfg.hidden_size, cfg.moe_intermediate_size, dtype), torch.device("cpu"))
    for layer, expert in [(0, 0), (1, 3)]:
        gate_up, down = expected(path, ("w1", "w3", "w2"), layer, expert, fused)
        for ticket in (None, ReadGate().ticket()):
            pool.data.fill_(0)
            reader.read(layer, expert, pool.targets(0), ticket)
            assert torch.equal(pool[0][0], gate_up.to(dtype)) and torch.equal(pool[0][1], down.to(dtype))
    assert not reader.refused
    reader.close()


def test_a_file_system_that_refuses_direct_reads_gets_buffered_ones(model_dir, monkeypatch):
    import errno

    from offload.cache import store

    path = model_dir("mixtral")
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    reader = ExpertReader(ckpt.expert_extents, ckpt.shard_files(), drop_cache=True, direct=True)
    if not reader.direct:
        pytest.skip("this file system refuses O_DIRECT")
    real, direct_fds = os.preadv, set(reader.direct.values())

    def einval(fd, bufs, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(store.os, "preadv", einval)
    pool = SlotPool(1, ExpertFormat("dense", cfg.hidden_size, cfg.moe_intermediate_size, torch.float32),
                    torch.device("cpu"))
    reader.read(0, 1, pool.targets(0))
    gate_up, down = expected(path, ("w1", "w3", "w2"), 0, 1, False)
    assert torch.equal(pool[0][0], gate_up) and torch.equal(pool[0][1], down)
    assert reader.refused == set(reader.direct)  # from now on buffered, pages dropped after each read
    reader.close()
