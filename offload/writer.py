"""Writing a model directory in this runtime's own layout, all or nothing.

`offload quantize` and the converters of other formats (offload/sources/) all
produce the same thing: config.json, the tokenizer files, and safetensors
shards, one per decoder layer (its non-expert tensors, plus for a MoE layer
one uint8 tensor `...experts.packed` [E, bytes per expert] in an
offload/formats.py format), then one shard for the rest. Layers are written as
they come, so a conversion holds one layer at a time.

`staged_directory(out)` is the all-or-nothing part: everything goes into a
hidden temporary directory next to `out`, renamed into place when the block
ends normally; an error or Ctrl-C removes it.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import OffloadError

INDEX = "model.safetensors.index.json"
PACKED = "experts.packed"  # per MoE layer: uint8 [E, bytes per expert], row e = expert e


def check_new_directory(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OffloadError(f"{out} already exists and is not empty (or is a file); choose a new --out "
                           "(nothing was written)")


@contextmanager
def staged_directory(out: Path):
    """Yield a temporary directory that becomes `out` when the block succeeds."""
    out = Path(out)
    check_new_directory(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        as_umask_allows(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:  # errors and Ctrl-C alike: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def as_umask_allows(folder: Path) -> None:
    """mkdtemp-style folders are 0700 and safetensors writes 0600: give the finished folder the
    permissions any file the user creates would get, so it can be shared like one."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


class ModelWriter:
    """Shards of one model directory, written layer by layer into `directory`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.weight_map: dict[str, str] = {}

    def add(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        save_file({n: t.contiguous() for n, t in tensors.items()}, self.directory / shard, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, shard))

    def add_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        self.add(f"model-layer{layer:05d}.safetensors", tensors)

    def finish(self, config: dict, fmt=None) -> None:
        """The index and config.json (with `fmt`'s quantization block when the experts are packed)."""
        from .formats import CONFIG_KEY

        total = sum(f.stat().st_size for f in self.directory.glob("*.safetensors"))
        (self.directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": self.weight_map}, indent=2))
        config = dict(config)
        if fmt is not None and fmt.quantized:
            config[CONFIG_KEY] = fmt.config_block()
        (self.directory / "config.json").write_text(json.dumps(config, indent=2))
