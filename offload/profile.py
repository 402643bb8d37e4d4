"""Hardware profiles: the handful of figures the hybrid scheduler needs about a
machine (memory sizes, link and disk bandwidth, expert-matmul throughput on
each side), as one frozen dataclass that TOML files map onto 1:1.

Profiles come from three places: the TOMLs shipped in profiles/ (datasheet
figures and stated estimates), `measure()` on the machine at hand, or
`cached_profile()`, which measures once per host and keeps the result.
The cost arithmetic that uses the figures lives in offload/scheduler.py.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import time
import tomllib
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path

from .errors import OffloadError

DEVICES = ("cuda", "cpu")
BYTE_FIELDS = ("device_memory", "host_memory", "h2d_bandwidth", "disk_bandwidth")
RATE_FIELDS = ("cpu_gflops_1", "cpu_gflops_batch", "device_gflops_1", "device_gflops_batch")
DEVICE_FIELDS = ("device_memory", "h2d_bandwidth", "device_gflops_1", "device_gflops_batch")
UNITS = dict(  # the comment save_profile writes after each field
    name="profile name", device='"cuda" or "cpu"', device_memory="bytes", host_memory="bytes",
    h2d_bandwidth="bytes/s, pinned host -> device", disk_bandwidth="bytes/s, sequential read",
    cpu_gflops_1="GFLOP/s, expert at 1 token", cpu_gflops_batch="GFLOP/s, expert at a large batch",
    device_gflops_1="GFLOP/s, expert at 1 token", device_gflops_batch="GFLOP/s, expert at a large batch",
    cpu_threads="threads for CPU experts", source="where the figures come from",
    cpu_weight_bytes="bytes per expert weight the CPU kernel read for cpu_gflops_*: 2 for bf16")


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: str  # "cuda" or "cpu"
    device_memory: int  # bytes; 0 for cpu-only
    host_memory: int  # bytes
    h2d_bandwidth: int  # bytes/s host -> device from pinned memory; 0 for cpu-only
    disk_bandwidth: int  # bytes/s sequential read on the drive holding the model
    cpu_gflops_1: float  # CPU expert matmul at 1 token (weight-bandwidth bound)
    cpu_gflops_batch: float  # CPU expert matmul at a large batch (the compute roof)
    device_gflops_1: float  # the same on the device; 0 for cpu-only
    device_gflops_batch: float
    cpu_threads: int
    source: str = ""
    # Bytes per expert weight that the CPU kernel read when cpu_gflops_* were taken: 2 for 16-bit
    # weights, ~1 for int8, ~0.53-0.63 for int4. At batch 1 a CPU expert streams its weights, so the
    # cost model scales cpu_gflops_1 by this over the simulated format's bytes (scheduler.CostModel);
    # a profile measured on a quantized model says so here, and is not scaled twice.
    cpu_weight_bytes: float = 2.0

    def __post_init__(self):
        where = f"profile {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise OffloadError("a hardware profile needs a non-empty name")
        if self.device not in DEVICES:
            raise OffloadError(f"{where}: device={self.device!r}; use 'cuda' or 'cpu'")
        if not isinstance(self.source, str):
            raise OffloadError(f"{where}: source must be a string saying where the figures come from")
        for f in BYTE_FIELDS + ("cpu_threads",):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OffloadError(f"{where}: {f}={value!r} must be a whole number >= 0")
        for f in RATE_FIELDS + ("cpu_weight_bytes",):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                unit = "bytes per weight" if f == "cpu_weight_bytes" else "GFLOP/s"
                raise OffloadError(f"{where}: {f}={value!r} must be a finite number of {unit} >= 0")
        stray = [f for f in DEVICE_FIELDS if getattr(self, f)] if self.device == "cpu" else []
        if stray:
            raise OffloadError(f"{where}: a cpu profile has no device; set {', '.join(stray)} to 0")
        required = ("host_memory", "disk_bandwidth", "cpu_gflops_1", "cpu_gflops_batch", "cpu_threads",
                    "cpu_weight_bytes")
        zero = [f for f in required + (DEVICE_FIELDS if self.device == "cuda" else ()) if getattr(self, f) <= 0]
        if zero:
            raise OffloadError(f"{where}: {', '.join(zero)} must be positive; fix the TOML or run "
                               "offload.profile.measure() on the machine")
        # The roofline min(batch, gflops_1 * n) assumes the roof is not below the batch-1 figure.
        for side in ("cpu", "device"):
            one, batch = getattr(self, f"{side}_gflops_1"), getattr(self, f"{side}_gflops_batch")
            if batch < one:
                raise OffloadError(f"{where}: {side}_gflops_batch={batch} is below {side}_gflops_1={one}; "
                                   "throughput at a large batch cannot be lower than at one token")


FIELDS = tuple(f.name for f in fields(HardwareProfile))
OPTIONAL = ("source", "cpu_weight_bytes")  # have defaults: profiles written before them still load


def _size(value, key: str, rate: bool) -> int:
    """"16GiB", "500MB" or a number -> bytes; rates may end in "/s" ("12GB/s")."""
    from accelerate.utils import convert_file_size_to_int

    text = value.strip().removesuffix("/s") if rate and isinstance(value, str) else value
    try:
        if isinstance(text, bool) or not isinstance(text, (int, float, str)):
            raise TypeError
        return int(text) if isinstance(text, float) and text.is_integer() else convert_file_size_to_int(text)
    except (ValueError, TypeError, AttributeError):
        example = "'12GB/s' or a number of bytes per second" if rate else "'16GiB', '512MB' or a number of bytes"
        raise OffloadError(f"{key}={value!r} is not understood; write it like {example}") from None


def profile_from_dict(raw: dict, origin: str) -> HardwareProfile:
    unknown = sorted(set(raw) - set(FIELDS))
    missing = [f for f in FIELDS if f not in raw and f not in OPTIONAL]
    if unknown or missing:
        problem = "; ".join(f"{what} key(s) {', '.join(keys)}"
                            for what, keys in (("unknown", unknown), ("missing", missing)) if keys)
        raise OffloadError(f"{origin}: {problem}; a profile has exactly: {', '.join(FIELDS)}")
    values = dict(raw)
    for key in BYTE_FIELDS:
        values[key] = _size(raw[key], f"{origin}: {key}", rate=key.endswith("bandwidth"))
    try:
        return HardwareProfile(**values)
    except OffloadError as exc:
        raise OffloadError(f"{origin}: {exc}") from None


def _shipped_dir():
    try:
        return files("offload.profiles")
    except ModuleNotFoundError:
        # Until pyproject maps profiles/ to offload.profiles (and in a checkout used without
        # installing), the TOMLs sit in the repository's profiles/ next to offload/.
        return Path(__file__).resolve().parent.parent / "profiles"


def shipped_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in _shipped_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path) -> HardwareProfile:
    """A shipped profile by name ("colab-t4"), or a TOML file by path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise OffloadError(f"no profile file at {path}; pass an existing TOML file or a shipped name: "
                               f"{', '.join(shipped_profiles())}")
        data, origin = path.read_bytes(), str(path)
    else:
        if text not in shipped_profiles():
            raise OffloadError(f"unknown hardware profile {text!r}; shipped profiles: {', '.join(shipped_profiles())}, "
                               "or pass the path of a TOML file")
        data, origin = (_shipped_dir() / f"{text}.toml").read_bytes(), f"profile {text!r}"
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OffloadError(f"{origin} is not valid TOML ({exc}); fix the file or save it again") from None
    return profile_from_dict(raw, origin)


def _toml_value(value) -> str:
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)  # ints, and floats in a form that reads back to the same float


def save_profile(profile: HardwareProfile, path) -> Path:
    """Write the profile as TOML, one commented line per field; a temp name then a rename, so a
    crash never leaves half a file where a profile is expected."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Hardware profile for moe-offload (offload.profile.HardwareProfile), written by save_profile."]
    lines += [f"{f} = {_toml_value(getattr(profile, f))}  # {UNITS[f]}" for f in FIELDS]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-offload" / f"profile-{socket.gethostname()}.toml"


def cached_profile(model_dir=None, **measure_options) -> HardwareProfile:
    """profile="auto": this host's measured profile, measured on first use and kept as TOML.
    The figures are taken at the first model's expert shape and drive; delete the file to re-measure."""
    path = cache_path()
    if path.is_file():
        try:
            return load_profile(path)
        except OffloadError:
            pass  # a damaged or outdated cache file is simply measured again
    profile = measure(model_dir, **measure_options)
    save_profile(profile, path)
    return profile


MiB = 1 << 20


def measure(model_dir=None, device: str = "auto", *, hidden: int | None = None, intermediate: int | None = None,
            dtype: str | None = None, read_bytes: int = 512 * MiB, batch: int = 64, repeats: int = 5,
            experts: str | None = None, tmp_dir=None) -> HardwareProfile:
    """Measure this machine. The expert shape and dtype are the model's (config.json) when given,
    else H=2048, I=5632 in bf16 (a 69 MB expert). The matmul timings rotate through copies of
    the weights larger than any cache, so batch 1 measures memory bandwidth as a real model's
    experts see it. The expert kernel is the one the model's expert format runs (int8/int4 for a
    quantized model, or as `experts` says). Each rate is the median of `repeats` runs."""
    import psutil
    import torch

    from .config import DTYPES, resolve_device

    from .formats import ExpertFormat, parse_experts

    H, I, name = 2048, 5632, "bfloat16"
    kind, group = parse_experts(experts)
    if model_dir is not None:
        from .checkpoint import Checkpoint

        ckpt = Checkpoint(Path(model_dir))
        H, I, name = ckpt.config.hidden_size, ckpt.config.moe_intermediate_size, ckpt.config.dtype
        if ckpt.expert_format.quantized and experts is None:
            kind, group = ckpt.expert_format.kind, ckpt.expert_format.group_size
        ckpt.close()
    H, I, name = hidden or H, intermediate or I, dtype or name
    if name not in DTYPES:
        raise OffloadError(f"dtype={name!r} is not supported; use float32, bfloat16 or float16")
    weights = DTYPES[name]
    # The runtime computes fp16 checkpoints in fp32 on a CPU (config.compute_dtype): time what it runs.
    cpu_dtype = torch.float32 if weights == torch.float16 else weights
    dev, cpu = resolve_device(device), torch.device("cpu")
    threads = torch.get_num_threads()
    cpu_fmt = ExpertFormat(kind, H, I, cpu_dtype, group)
    cpu_1 = _expert_gflops(cpu, cpu_fmt, 1, repeats)
    cpu_b = _expert_gflops(cpu, cpu_fmt, batch, repeats)
    device_memory = h2d = dev_1 = dev_b = 0
    what = _cpu_name()
    if dev.type == "cuda" and torch.cuda.is_available():
        device_memory = torch.cuda.get_device_properties(dev).total_memory
        h2d = h2d_bandwidth(dev, 256 * MiB, repeats)
        dev_fmt = ExpertFormat(kind, H, I, weights, group)
        dev_1 = _expert_gflops(dev, dev_fmt, 1, repeats)
        # A GPU's fp16 ridge point is ~200 FLOP/byte, i.e. ~200 tokens: at 64 it is still bandwidth bound.
        dev_b = max(dev_1, _expert_gflops(dev, dev_fmt, max(batch, 512), repeats))
        what += f" + {torch.cuda.get_device_name(dev)}"
    disk, disk_where = _disk_bandwidth(model_dir, read_bytes, tmp_dir)
    return HardwareProfile(
        name=f"measured-{socket.gethostname()}", device=dev.type, device_memory=int(device_memory),
        host_memory=int(psutil.virtual_memory().total), h2d_bandwidth=int(h2d), disk_bandwidth=int(disk),
        # A noisy run can put the batch figure under the batch-1 one; the roof cannot be lower.
        cpu_gflops_1=round(cpu_1, 3), cpu_gflops_batch=round(max(cpu_b, cpu_1), 3),
        device_gflops_1=round(dev_1, 3), device_gflops_batch=round(dev_b, 3), cpu_threads=threads,
        cpu_weight_bytes=round(cpu_fmt.nbytes / (3 * H * I), 4),  # what the CPU kernel read: no double scaling
        source=(f"measured here with offload.profile.measure() on {datetime.date.today().isoformat()}: {what}, "
                f"{threads} CPU threads, expert H={H} I={I} {cpu_fmt.name if cpu_fmt.quantized else name} "
                f"(CPU in {str(cpu_dtype)[6:]}), "
                f"batch {batch}, disk read of {disk_where}"),
    )


def h2d_bandwidth(device, nbytes: int = 256 * MiB, repeats: int = 5) -> float:
    """Bytes/s of one copy from pinned host memory to `device` (a CUDA GPU), median of `repeats`."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    return nbytes / _median_seconds(lambda: dst.copy_(src, non_blocking=True), repeats,
                                    lambda: torch.cuda.synchronize(device))


def _median_seconds(run, repeats: int, sync=lambda: None) -> float:
    """Median wall time of `repeats` runs, after one warm-up that pays allocation and kernel selection."""
    times = []
    for _ in range(repeats + 1):
        sync()  # the clock must not start while earlier work is still queued
        start = time.perf_counter()
        run()
        sync()  # nor stop before this run's work is done
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _expert_gflops(device, fmt, n: int, repeats: int) -> float:
    """The runtime's own expert kernel for `fmt` (offload.kernels.expert_kernel, an expert's bytes
    as the engine keeps them in a slot) on n tokens: 2 * 3 * H * I * n FLOPs. Calls rotate through
    copies of the expert that together exceed any last-level cache (256 MiB), so each call streams
    its weights from memory as a real model's experts do; one expert reused would sit in cache
    and flatter batch 1."""
    import torch
    import torch.nn.functional as F

    from .kernels import expert_kernel

    H, I = fmt.hidden, fmt.width
    gen = torch.Generator().manual_seed(0)
    one = fmt.quantize(*(torch.randn(*shape, generator=gen) * 0.02 for shape in ((I, H), (I, H), (H, I))))
    copies = max(2, -(-256 * MiB // fmt.nbytes))
    slots = one.to(device).repeat(copies, 1)  # [copies, nbytes]: distinct memory, same expert
    x = torch.randn(n, H, generator=gen).to(device, fmt.dtype)  # [n, H]
    kernel = expert_kernel(fmt, device, F.silu)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    turn = iter(range(1 << 62))
    with torch.inference_mode():
        seconds = _median_seconds(lambda: kernel(x, fmt.views(slots[next(turn) % copies])), repeats, sync)
    return 6 * H * I * n / seconds / 1e9


def _disk_bandwidth(model_dir, read_bytes: int, tmp_dir=None) -> tuple[float, str]:
    """Reads after asking the kernel to drop the files' cached pages, so the figure is the
    drive's and not the page cache's (pages a running process has mapped stay cached: measure before
    loading the model). Without a model, a temp file of `read_bytes` in `tmp_dir` (default: the
    system's temp directory), removed afterwards, also on Ctrl-C or an error."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if model_dir is not None else []
    tmp = None
    from .cache.store import IO_THREADS, drop_from_page_cache, read_bandwidth  # here: this module stays torch-free

    try:
        if not files:
            where = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
            tmp = tempfile.NamedTemporaryFile(dir=where, prefix=".offload-disk-", delete=False)
            block = os.urandom(MiB)  # incompressible, so a compressing filesystem cannot flatter the figure
            with tmp:
                for _ in range(max(1, read_bytes // MiB)):
                    tmp.write(block)
                tmp.flush()
                os.fsync(tmp.fileno())  # dirty pages cannot be dropped: write them out first
            files = [Path(tmp.name)]
        rates = []
        for _ in range(3):  # a shared or virtual drive varies from read to read: the median of three
            drop_from_page_cache(files)
            # expert-sized reads on as many threads as the engine's I/O pool: the rate it will see
            rates.append(read_bandwidth(files, limit=read_bytes, chunk=16 * MiB, threads=IO_THREADS))
        rate = sorted(rates)[1]
        done = min(read_bytes, sum(f.stat().st_size for f in files))
    finally:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
    if tmp is not None:
        parent = Path(tmp.name).parent
        where = f"a temp file in {parent}" + (" (in RAM: tmpfs, not a disk)" if in_memory_fs(parent) else "")
    else:
        where = str(model_dir)
    return rate, f"{done / MiB:.0f} MiB of {where}, median of 3, {IO_THREADS} readers at once"


def in_memory_fs(path, mounts: str = "/proc/mounts") -> bool:
    """Whether `path` is on a RAM filesystem (tmpfs, ramfs; /tmp is one on many systems), where a
    "disk" read measures memory: the mount in /proc/mounts with the longest prefix of the path."""
    path, best, kind = str(Path(path).resolve()), "", ""
    try:
        with open(mounts, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and (path == fields[1] or path.startswith(fields[1].rstrip("/") + "/")) \
                        and len(fields[1]) >= len(best):
                    best, kind = fields[1], fields[2]
    except OSError:
        return False
    return kind in ("tmpfs", "ramfs")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()
