"""Model families, one file each; `family_for` picks one from a config.json."""

from ..errors import OffloadError
from . import deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from .family import Family

FAMILIES: dict[str, Family] = {
    m.FAMILY.architecture: m.FAMILY for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, gpt_oss)
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def family_for(raw_config: dict) -> Family:
    """The family named by config.json's `architectures` (or `model_type`)."""
    names = raw_config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise OffloadError(f"config.json's architectures should be a list of names, not {names!r}")
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    model_type = raw_config.get("model_type")
    if not names and isinstance(model_type, str) and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    shown = ", ".join(names) if names else f"model_type {model_type!r}"
    raise OffloadError(
        f"architecture {shown} is not supported yet; supported: {', '.join(sorted(FAMILIES))}"
    )


__all__ = ["FAMILIES", "Family", "family_for"]
