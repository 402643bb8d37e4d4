"""Checkpoints in formats people download (GGUF files; GPTQ, AWQ and FP8 safetensors), turned
into this runtime's own model directory once, cached, and loaded like any other.

`model_directory(model)` is what `offload.load` calls: a plain Hugging Face directory (or hub
id) comes back as it is; another format is converted by its module here (each writes the
layout of offload/writer.py, with experts in an offload/formats.py format) into the user's
cache, keyed by the source files' names, sizes and times, and reused from then on.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable

from ..errors import OffloadError


def cache_root() -> Path:
    """Where converted and quantized models go: $MOE_OFFLOAD_CACHE, else ~/.cache/moe-offload."""
    base = os.environ.get("MOE_OFFLOAD_CACHE")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-offload"
    return Path(base)


def fingerprint(files: list[Path]) -> str:
    """Names, sizes and modification times of the source files: a changed source is converted again."""
    digest = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        digest.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def cached_conversion(kind: str, name: str, files: list[Path], make: Callable[[Path], Path],
                      what: str, echo=None) -> Path:
    """The directory `make(target)` writes (all or nothing) under the cache, made now if absent."""
    target = cache_root() / kind / f"{name}-{fingerprint(files)}"
    if (target / "config.json").is_file():
        return target
    if echo is not None:
        echo(f"{what} once, into {target} (reused next time; set MOE_OFFLOAD_CACHE to put it elsewhere)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return make(target)
    except OSError as exc:
        if (target / "config.json").is_file():  # another process finished it first
            return target
        raise OffloadError(f"could not write {target} ({exc}); free some disk space or set MOE_OFFLOAD_CACHE "
                           "to another directory") from None


def stderr(message: str) -> None:
    print(message, file=sys.stderr)


def model_directory(model, echo=stderr) -> Path:
    """A directory in this runtime's layout holding `model` (a directory, a hub id, or a file of
    another format), converting it once if needed."""
    from ..checkpoint import read_json, resolve_model_path

    if str(model).lower().endswith(".gguf"):  # a file, split parts, or "org/repo/file.gguf" on the hub
        from .gguf import open_gguf

        return open_gguf(model, echo)
    path = resolve_model_path(model)
    config = read_json(path / "config.json", "a model directory needs its config.json")
    quantization = config.get("quantization_config")
    if quantization is None:
        return path
    from ..formats import mxfp4_checkpoint

    if mxfp4_checkpoint(config):  # GPT-OSS as released: its MXFP4 experts are read as they are
        return path
    from .prequantized import open_prequantized

    return open_prequantized(path, config, echo)
