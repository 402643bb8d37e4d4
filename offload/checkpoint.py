"""A Hugging Face model directory (or hub id) as lazy tensors.

Nothing is read until asked for: `tensor(name)` reads one (resident) tensor
from its shard with `safetensors.safe_open`, and `expert_extents(layer, e)`
says where one routed expert's three matrices lie on disk, from per-expert
names or from transformers' fused `experts.gate_up_proj` / `experts.down_proj`
(row `e` only), so each expert is read alone (cache/store.py).
"""

from __future__ import annotations

import json
import math
import os
import struct
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import OffloadError
from .formats import stored_format
from .writer import PACKED
from .models import family_for

PREDICTOR_FILE = "predictor.safetensors"  # predictors/learned.py's FILENAME
# Weights and configs only; chat_template.jinja is where transformers 5 keeps the chat template.
_HUB_PATTERNS = ["*.json", "*.safetensors", "chat_template.jinja"]


def resolve_model_path(model: str | os.PathLike, patterns=_HUB_PATTERNS) -> Path:
    """A local directory as is; otherwise treat `model` as a hub id and download the files
    matching `patterns` (the whole model by default; ["config.json"] for its shape only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise OffloadError(f"{path} is a file; pass the model's directory (the one holding config.json)")
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise OffloadError(f"model directory {path} does not exist (and {name!r} is not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        reason = " ".join(str(exc).split())[:300]
        raise OffloadError(
            f"could not download {name!r} from the hub ({type(exc).__name__}: {reason}); "
            "check the id and the network, or pass a local directory holding config.json and *.safetensors"
        ) from None


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise OffloadError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OffloadError(f"{path} is not valid JSON ({exc}); re-download or re-save the model") from None
    if not isinstance(data, dict):
        raise OffloadError(f"{path} should hold a JSON object")
    return data


class Checkpoint:
    """Lazy, name-addressed access to a model directory's safetensors shards."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.raw_config = read_json(self.path / "config.json", "a model directory needs its config.json")
        self.family = family_for(self.raw_config)
        self.config = ModelConfig.from_dict(self.raw_config, self.family)
        cfg = self.config
        # How the routed experts are stored: dense in the checkpoint's dtype, or int8/int4 as written
        # by `offload quantize` (the runtime re-targets a dense format to its compute dtype).
        self.expert_format = stored_format(self.raw_config, cfg.hidden_size, cfg.moe_intermediate_size,
                                           cfg.torch_dtype)
        self._files = ExitStack()
        self._handles: dict[str, object] = {}
        self._extents: dict[str, dict] = {}  # shard -> tensor name -> Extent, parsed on demand
        self.weight_map = self._weight_map()  # tensor name -> shard file name

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "the index names the shards").get("weight_map")
            if not isinstance(weight_map, dict):
                raise OffloadError(f"{index} has no 'weight_map' object; re-download the model")
        else:
            # Every *.safetensors but the learned predictor `offload train-predictor` saves beside the model.
            shards = sorted(p.name for p in self.path.glob("*.safetensors") if p.name != PREDICTOR_FILE)
            if not shards:
                found = [p.name for p in self.path.glob("*.bin")]
                hint = " (found PyTorch .bin files: convert them to safetensors)" if found else ""
                raise OffloadError(f"no *.safetensors weights in {self.path}{hint}")
            weight_map = {}
            for shard in shards:
                weight_map.update(dict.fromkeys(self._handle(shard).keys(), shard))
        missing = sorted({s for s in weight_map.values() if not (self.path / s).exists()})
        if missing:
            raise OffloadError(
                f"{self.path} lacks shard(s) {', '.join(missing)} named in model.safetensors.index.json; "
                "download the missing files again"
            )
        return weight_map

    def _handle(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = self._files.enter_context(safe_open(self.path / shard, "pt", device="cpu"))
            except Exception as exc:
                raise OffloadError(f"cannot read {self.path / shard} ({exc}); the file is damaged or truncated") from None
        return self._handles[shard]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def find(self, *names: str) -> str | None:
        """The first of `names` that the checkpoint holds."""
        return next((n for n in names if n in self.weight_map), None)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise OffloadError(f"{self.path} has no tensor {name!r}; the checkpoint does not match its config.json")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def _moe_prefixes(self, layer: int) -> list[str]:
        return [f"model.layers.{layer}.{p}" for p in (self.family.moe_prefix, *self.family.moe_aliases)]

    def expert_extents(self, layer: int, expert: int):
        """Where one expert's bytes lie on disk, for direct reads: (gate, up, down) of a dense
        checkpoint, the one packed extent of a quantized one (row `expert` of `experts.packed`),
        or GPT-OSS's pieces in the format's order (`read_targets`)."""
        gate_n, up_n, down_n = self.family.expert_names
        for prefix in self._moe_prefixes(layer):
            fmt = self.expert_format
            if self.family.expert_layout == "gpt_oss" and (fmt.apart or not fmt.quantized):  # not `offload quantize`d
                found = self._gpt_oss_extents(prefix, expert)
                if found is not None:
                    return found
                continue
            if self.expert_format.quantized:
                name = f"{prefix}.{PACKED}"
                if self.has(name):
                    stacked = self._extent(name)
                    if len(stacked.shape) != 2 or stacked.shape[0] != self.config.num_experts:
                        raise OffloadError(f"{name} has shape {stacked.shape}, not [num_experts="
                                           f"{self.config.num_experts}, bytes per expert]; quantize the model again")
                    return (stacked.row(expert),)
                continue
            base = f"{prefix}.experts.{expert}."
            names = [self.find(base + n + ".weight", base + n) for n in (gate_n, up_n, down_n)]
            if all(names):
                return tuple(self._extent(n) for n in names)
            fused, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
            if self.has(fused) and self.has(down):
                gate, up = self._extent(fused).row(expert).split_rows()
                return gate, up, self._extent(down).row(expert)
        raise OffloadError(f"{self.path} has no weights for expert {expert} of layer {layer}")

    def _gpt_oss_extents(self, prefix: str, expert: int):
        """Row `expert` of GPT-OSS's stacked tensors: gate_up [H, 2I], down [I, H] and the two biases
        as transformers saves them; or, as released, MXFP4 blocks [N, K/32, 16] (seen as the [N, K/2]
        bytes they are) and scales [N, K/32] of gate_up (N = 2I) and down (N = H), then the biases."""
        names = ("gate_up_proj", "down_proj") if not self.expert_format.quantized else (
            "gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
        names = [f"{prefix}.experts.{n}" for n in (*names, "gate_up_proj_bias", "down_proj_bias")]
        if not all(self.has(n) for n in names):
            return None
        rows = []
        for name in names:
            stacked = self._extent(name)
            if not stacked.shape or stacked.shape[0] != self.config.num_experts:
                raise OffloadError(f"{name} has shape {list(stacked.shape)}, not [num_local_experts="
                                   f"{self.config.num_experts}, ...]; the checkpoint does not match its config.json")
            row = stacked.row(expert)
            if name.endswith("_blocks") and len(row.shape) == 3:
                row = replace(row, shape=(row.shape[0], row.shape[1] * row.shape[2]))
            rows.append(row)
        return tuple(rows)

    def check_experts(self, fmt) -> None:
        """Every routed expert's extents against the slot they are read into (`fmt`, the runtime's
        format): a wrong size or dtype is a damaged or mismatched checkpoint, refused at load
        rather than read into a slot as garbage."""
        targets = fmt.read_targets(torch.empty(fmt.nbytes, dtype=torch.uint8))
        for layer in self.config.moe_layers:
            for expert in range(self.config.num_experts):
                extents = self.expert_extents(layer, expert)
                for extent, target in zip(extents, targets):
                    size = math.prod(extent.shape)
                    # The shape, not just the size: a transposed [H, I] expert would compute garbage.
                    if len(extents) != len(targets) or tuple(extent.shape) != tuple(target.shape) or (
                            extent.dtype != target.dtype if fmt.quantized else not extent.dtype.is_floating_point):
                        raise OffloadError(
                            f"expert {expert} of layer {layer} in {extent.file.name} has shape {list(extent.shape)} "
                            f"({size} {str(extent.dtype)[6:]} values), but {fmt.name} experts of this config need "
                            f"shape {list(target.shape)} of "
                            f"{str(target.dtype)[6:] if fmt.quantized else 'floating point'} values; "
                            "the checkpoint is damaged or does not "
                            "match its config.json" + (" (quantize it again)" if fmt.quantized else ""))

    def _extent(self, name: str):
        from .cache.store import safetensors_extents

        shard = self.weight_map[name]
        if shard not in self._extents:
            try:
                self._extents[shard] = safetensors_extents(self.path / shard)
            except (OSError, ValueError, KeyError, struct.error) as exc:
                raise OffloadError(f"{self.path / shard} is damaged: {exc}; download the file again") from None
        extents = self._extents[shard]
        if name not in extents:
            raise OffloadError(f"model.safetensors.index.json puts {name} in {shard}, which has no such tensor; "
                               "the index does not match the shards: download them again")
        return extents[name]

    def shard_files(self) -> list[Path]:
        return sorted({self.path / s for s in self.weight_map.values()})

    def resident_name(self, name: str) -> str:
        """Checkpoint name of a resident (non-expert) weight, allowing the family's aliases."""
        candidates = [name]
        for alias in self.family.moe_aliases:
            candidates.append(name.replace(f".{self.family.moe_prefix}.", f".{alias}.", 1))
        found = self.find(*candidates)
        if found is None:
            raise OffloadError(f"{self.path} has no tensor {name!r}; the checkpoint does not match its config.json")
        return found

    def close(self):
        self._files.close()
        self._handles.clear()
