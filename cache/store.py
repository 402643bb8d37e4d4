"""The bytes of routed experts: where each lies in the checkpoint's own
safetensors files, and preallocated slots to read or copy it into.

Experts are read with pread straight from the checkpoint's shards (a
per-expert tensor, or one row of a fused [E, ...] tensor, is one contiguous
extent), into slot memory, with no intermediate allocation; a dtype change
goes through one reusable scratch buffer per I/O thread. The page cache is
the kernel's business: nothing here maps the files.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OffloadError
from .priority import CHUNK

# The engine's I/O pool: experts read at once (and how `offload profile` reads the disk). One per core
# this process may use, 2 to 4: with 2 cores (`offload bench --cases c --io-threads 1,2,4 --threads 1`,
# synthetic Mixtral, 2 rounds) 2 threads read as fast as 4 (bf16 4.78 / 4.94 tok/s, int4 9.78 / 9.62)
# with less waiting for a core (run-queue wait 32-53% of wall time against 30-69%), and 1 is 15-25% slower.
IO_THREADS = min(4, max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
                      "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


@dataclass(frozen=True)
class Extent:
    """One tensor (or one row of it) in a safetensors file."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def row(self, index: int) -> "Extent":
        """Row `index` of a tensor whose first dimension is the expert."""
        row_bytes = self.nbytes // self.shape[0]
        return Extent(self.file, self.offset + index * row_bytes, row_bytes, self.dtype, self.shape[1:])

    def split_rows(self) -> tuple["Extent", "Extent"]:
        """First and second half of the rows (gate and up of a fused gate_up matrix)."""
        half = self.nbytes // 2
        shape = (self.shape[0] // 2, *self.shape[1:])
        return (Extent(self.file, self.offset, half, self.dtype, shape),
                Extent(self.file, self.offset + half, half, self.dtype, shape))


MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def safetensors_extents(path: Path) -> dict[str, Extent]:
    """Every tensor's byte range in a safetensors file, from its JSON header, checked the way
    safetensors checks a file it opens: a bounded header, each tensor's bytes inside the file,
    its length equal to its shape times its dtype, and no two tensors overlapping. (A shard
    holding only experts is never opened by safetensors itself: we pread from it.)
    Raises ValueError naming the tensor."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER, size - 8):
            raise ValueError(f"header length {header_len} exceeds the file ({size} bytes) or {MAX_HEADER} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    base = 8 + header_len
    extents, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, start, end])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"tensor {name}: malformed entry {str(info)[:200]}")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has dtype {dtype}, not one of {', '.join(SAFETENSORS_DTYPES)}")
        expected = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if not start <= end <= size - base or end - start != expected:
            raise ValueError(f"tensor {name}: bytes {start}..{end} do not hold its shape {shape} {dtype} "
                             f"({expected} bytes) inside the file's {size - base} data bytes")
        spans.append((start, end, name))
        extents[name] = Extent(Path(path), base + start, end - start, SAFETENSORS_DTYPES[dtype], tuple(shape))
    # As safetensors requires: the tensors tile the data section exactly, no overlap, no gap. (A header
    # length off by a byte would otherwise shift every tensor and still look valid.)
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(f"tensors {a} and {b} overlap")
        if start_b > end_a:
            raise ValueError(f"a gap of {start_b - end_a} bytes lies between tensors {a} and {b}")
    covered = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    if covered != (0, size - base):
        raise ValueError(f"the tensors cover data bytes {covered[0]}..{covered[1]}, not the file's "
                         f"0..{size - base}: the header length or the file size is wrong")
    return extents


def drop_from_page_cache(files) -> None:
    """Ask the kernel to forget these files' cached pages (clean pages go; no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(files, limit: int = 1 << 30, chunk: int = 16 << 20, threads: int = 1) -> float:
    """Bytes per second reading up to `limit` bytes of `files` in `chunk`-sized preads, on
    `threads` threads at once (each with one reused buffer): with IO_THREADS, the way the
    engine's I/O pool reads experts, which on many drives is faster than one stream."""
    jobs, planned = [], 0  # (file, offset, length), in file order
    for f in files:
        size = os.path.getsize(f)
        for offset in range(0, size, chunk):
            if planned >= limit:
                break
            length = min(chunk, size - offset, limit - planned)
            jobs.append((f, offset, length))
            planned += length
    lock, done, errors = threading.Lock(), [0], []
    pending = iter(jobs)

    def worker():
        buf = bytearray(chunk)
        fds = {}
        try:
            while True:
                with lock:
                    job = next(pending, None)
                if job is None:
                    return
                f, offset, length = job
                if f not in fds:
                    fds[f] = os.open(f, os.O_RDONLY)
                fd = fds[f]
                n = os.preadv(fd, [memoryview(buf)[:length]], offset)
                with lock:
                    done[0] += max(0, n)
        except OSError as exc:
            errors.append(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(max(1, threads))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return done[0] / (time.perf_counter() - start)


def _bytes_of(t: torch.Tensor):
    """A writable uint8 numpy view of a contiguous CPU tensor's memory."""
    return t.view(torch.uint8).reshape(-1).numpy()


class ExpertReader:
    """Reads one expert's extents from disk into a slot (the targets its format names:
    gate, up and down rows of a dense slot, or a quantized expert's one run of bytes).

    With `drop_cache`, reads keep out of the kernel's page cache: when it cannot hold the experts
    anyway, it only duplicates the slots and evicts them. `direct` (where the file system allows
    it) reads with O_DIRECT, the disk writing into an aligned 4 MiB scratch copied into the slot;
    otherwise the pages just read are dropped (fadvise DONTNEED). Measured on this machine's disk
    (synthetic Mixtral, case c, 2 threads, `offload bench --drop-page-cache on,fadvise`, both
    orders): direct reads took about 40% of the CPU time per token, int4-g128 decoded 21-34%
    faster (bf16 within the disk's drift), and bf16 read exactly the bytes asked for (buffered
    reads 1.24x: readahead)."""

    def __init__(self, locate, files: list[Path], drop_cache: bool = False, direct: bool = False):
        self.locate = locate  # (layer, expert) -> tuple of Extents, in the format's target order
        self.fds = {Path(f): os.open(f, os.O_RDONLY) for f in files}
        self.local = threading.local()  # per-thread scratch for dtype conversion and direct reads
        self.drop_cache = drop_cache
        self.direct: dict[Path, int] = {}  # file -> its O_DIRECT descriptor
        self.refused: set[Path] = set()  # files whose O_DIRECT reads failed (EINVAL): buffered instead
        if drop_cache and direct and hasattr(os, "O_DIRECT"):
            for f in files:
                try:
                    self.direct[Path(f)] = os.open(f, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # tmpfs and some others refuse O_DIRECT: dropped pages instead
                    pass

    def read(self, layer: int, expert: int, targets: list[torch.Tensor], ticket=None) -> int:
        """The expert's extents into `targets`; its bytes. With a `ticket` (cache/priority.py: a
        speculative read) in chunks of CHUNK bytes, each waiting for the ticket's go-ahead."""
        extents = self.locate(layer, expert)
        for extent, dst in zip(extents, targets):
            if math.prod(extent.shape) != dst.numel() or len(extents) != len(targets):
                raise OffloadError(f"expert {expert} of layer {layer} in {extent.file} has shape {extent.shape}, but "
                                   f"this model's config needs {tuple(dst.shape)}; the checkpoint is damaged or "
                                   "does not match its config.json")
        parts = sorted(zip(extents, targets), key=lambda p: p[0].offset)
        if self._adjacent(parts):
            # One preadv scattering the file's contiguous bytes into the destinations:
            # measured about 20% faster from a cold disk than three separate reads.
            first = parts[0][0]
            self._pread(first.file, first.offset, sum(e.nbytes for e, _ in parts), [_bytes_of(d) for _, d in parts],
                        ticket)
        else:
            for extent, dst in parts:
                self._read(extent, dst, ticket)
        if self.drop_cache:
            for extent, _ in parts:
                if not self.reads_direct(extent.file):
                    os.posix_fadvise(self.fds[extent.file], extent.offset, extent.nbytes,
                                     os.POSIX_FADV_DONTNEED)
        return sum(e.nbytes for e in extents)

    def reads_direct(self, file: Path) -> bool:
        return file in self.direct and file not in self.refused

    @staticmethod
    def _adjacent(parts) -> bool:
        return all(
            e.file == parts[0][0].file and e.dtype == d.dtype and
            (i == 0 or e.offset == parts[i - 1][0].offset + parts[i - 1][0].nbytes)
            for i, (e, d) in enumerate(parts)
        )

    def _read(self, extent: Extent, dst: torch.Tensor, ticket=None) -> None:
        if extent.dtype == dst.dtype:
            self._pread(extent.file, extent.offset, extent.nbytes, [_bytes_of(dst)], ticket)
            return
        scratch = getattr(self.local, "buf", None)
        if scratch is None or scratch.numel() < extent.nbytes:
            scratch = self.local.buf = torch.empty(extent.nbytes, dtype=torch.uint8)
        raw = scratch[: extent.nbytes]
        self._pread(extent.file, extent.offset, extent.nbytes, [raw.numpy()], ticket)
        dst.copy_(raw.view(extent.dtype).view(extent.shape))

    def _pread(self, file: Path, offset: int, nbytes: int, buffers: list, ticket=None) -> None:
        """Fill `buffers` in order from `nbytes` contiguous bytes at `offset`, however short the reads
        (with a `ticket`, CHUNK bytes at most per read, each after `ticket.proceed()`)."""
        if self.reads_direct(file):
            return self._pread_direct(file, offset, nbytes, buffers, ticket)
        fd, done = self.fds[file], 0
        views = [memoryview(b) for b in buffers]
        while done < nbytes:
            if ticket is None:
                n = os.preadv(fd, views, offset + done)
            else:
                ticket.proceed()  # waits while demand reads run; raises Cancelled
                n = os.preadv(fd, views if ticket.promoted else _first_bytes(views, CHUNK), offset + done)
                ticket.bytes += max(n, 0)
            if n <= 0:
                raise OSError(f"{file} ended early: the checkpoint is truncated")
            done += n
            while n > 0:  # drop what this read filled
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0], n = views[0][n:], 0

    def _pread_direct(self, file: Path, offset: int, nbytes: int, buffers: list, ticket=None) -> None:
        """_pread with O_DIRECT: the pages around the bytes, DIRECT_WINDOW at a time (a guess: CHUNK),
        into the thread's aligned scratch, each window's bytes then copied into `buffers` (a torch
        copy: it releases the GIL). The disk's DMA needs no core, so a read costs the compute only
        that copy, and the scratch stays small whatever the expert's size (one 4 MiB read after
        another was as fast as one 22 MB read on this machine's disk). A file system that refuses
        an O_DIRECT read (EINVAL) gets buffered reads from then on."""
        first = offset // DIRECT_ALIGN * DIRECT_ALIGN
        end = -(-(offset + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN  # may pass the file's end: reads stop there
        scratch = _aligned_scratch(self.local, min(DIRECT_WINDOW, end - first))
        fd, view = self.direct[file], memoryview(scratch.numpy())
        dst, w = _Scatter(buffers), first
        try:
            while w < end:
                if ticket is not None:
                    ticket.proceed()  # waits while demand reads run; raises Cancelled
                # A guess reads a chunk at a time; promoted, it goes on as a demand read does.
                size, done = min(CHUNK if ticket is not None and not ticket.promoted else DIRECT_WINDOW, end - w), 0
                while w + done < min(w + size, offset + nbytes):
                    n = os.preadv(fd, [view[done:size]], w + done)
                    if n <= 0:
                        raise OSError(f"{file} ended early: the checkpoint is truncated")
                    done += n
                if ticket is not None:
                    ticket.bytes += done
                lo, hi = max(offset, w), min(offset + nbytes, w + done)
                dst.put(lo - offset, scratch[lo - w:hi - w])
                w += size
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.refused.add(file)  # the descriptor stays open until close(): another thread may use it now
            return self._pread(file, offset, nbytes, buffers, ticket)

    def close(self) -> None:
        for fd in self.direct.values():
            os.close(fd)
        self.direct.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses in logical blocks: pages cover every disk
DIRECT_WINDOW = 4 << 20  # bytes per O_DIRECT read of a demand read, and its scratch buffer per I/O thread


class _Scatter:
    """Destination buffers (numpy uint8 views of slot memory) as one run of bytes."""

    def __init__(self, buffers: list):
        self.parts = [torch.from_numpy(b).view(-1) for b in buffers]

    def put(self, at: int, src: torch.Tensor) -> None:
        """src's bytes at position `at` of the run."""
        for part in self.parts:
            n = part.numel()
            if at < n and src.numel():
                take = min(n - at, src.numel())
                part[at:at + take].copy_(src[:take])
                src, at = src[take:], 0
            else:
                at -= n


def _aligned_scratch(local, size: int) -> torch.Tensor:
    """A thread's DIRECT_ALIGN-aligned buffer of at least `size` bytes (kept, grown as needed)."""
    buf = getattr(local, "direct", None)
    if buf is None or buf.numel() < size:
        raw = torch.empty(size + DIRECT_ALIGN, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % DIRECT_ALIGN
        buf = local.direct = raw[shift:shift + size]
    return buf


def _first_bytes(views: list[memoryview], limit: int) -> list[memoryview]:
    """The leading `limit` bytes of a scatter list (one chunk of a speculative read)."""
    out = []
    for v in views:
        if limit <= 0:
            break
        out.append(v[:limit])
        limit -= len(v)
    return out


class SlotPool:
    """A fixed number of expert slots, allocated once as one uint8 [S, nbytes] tensor; a slot's
    bytes are one expert in `fmt` (offload/formats.py), viewed as the tensors its kernel takes."""

    def __init__(self, slots: int, fmt, device: torch.device, pin: bool = False):
        self.fmt = fmt
        self.data = torch.empty((slots, fmt.nbytes), device=device, dtype=torch.uint8, pin_memory=pin)
        self._views: dict[int, tuple] = {}  # built on first use: views cost microseconds per expert call

    def __getitem__(self, slot: int) -> tuple[torch.Tensor, ...]:
        views = self._views.get(slot)
        if views is None:
            views = self._views[slot] = self.fmt.views(self.data[slot])
        return views

    def targets(self, slot: int) -> list[torch.Tensor]:
        """Where a read of this slot's expert goes (ExpertReader.read)."""
        return self.fmt.read_targets(self.data[slot])

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def slots(self) -> int:
        return self.data.shape[0]
