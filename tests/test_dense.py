"""Opt-in int8 weights for the resident layers (offload/dense.py): the layers it takes and leaves,
logits close to the unquantized run (and exact to a dequantized-weights reference), named as
lossy everywhere, the same bits offloaded as resident."""

import pytest
import torch
import torch.nn.functional as F

import offload
from offload import OffloadError
from offload.dense import Int8Linear
from offload.quant import dequantize_int8
from conftest import FAMILIES
from test_offload import budget

PROMPT = [1, 30, 31, 32, 33, 34]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_close_to_the_unquantized_run_and_exact_to_its_own_weights(model_dir, family):
    path = model_dir(family, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    full, int8 = offload.load(path, device="cpu"), offload.load(path, device="cpu", dense="int8")
    swapped = {n for n, m in int8.model.named_modules() if isinstance(m, Int8Linear)}
    assert "lm_head" in swapped and any(n.endswith("self_attn.q_proj") for n in swapped)
    assert not any("gate" == n.rsplit(".", 1)[-1] or "router" in n for n in swapped)  # routers stay
    ours, ref = int8.logits(ids), full.logits(ids)
    assert (ours - ref).abs().max() <= 0.05 * ref.abs().max()  # per-channel int8: a few tenths of a percent
    # The swap itself is exact to the dequantized weights: put them back into the full model.
    for name in swapped:
        parent, _, attr = name.rpartition(".")
        module = int8.model.get_submodule(name)
        linear = full.model.get_submodule(name)
        linear.weight.data = dequantize_int8(module.q, module.scale, linear.weight.dtype)
    torch.testing.assert_close(ours, full.logits(ids), rtol=1e-5, atol=1e-5)
    assert "in int8 (quantized, lossy)" in int8.describe()
    assert int8.stats.as_dict()["quantized"] and int8.stats.as_dict()["dense_format"] == "int8"


def test_offloaded_is_bit_identical_and_bf16_runs(model_dir):
    path = model_dir("mixtral", num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     dtype=torch.bfloat16)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    resident = offload.load(path, device="cpu", dense="int8")
    assert all(m.fast for m in resident.model.modules() if isinstance(m, Int8Linear))  # bf16, widths of 32s
    llm = offload.load(path, device="cpu", dense="int8", cpu_memory=budget(path, 6)[0])
    assert llm.placement.mode == "offloaded"
    assert torch.equal(llm.logits(ids), resident.logits(ids))
    assert llm.generate(PROMPT, max_new_tokens=8).token_ids == resident.generate(PROMPT, max_new_tokens=8).token_ids


def test_a_width_the_kernel_cannot_take_is_dequantized_per_call():
    linear = torch.nn.Linear(40, 64, dtype=torch.bfloat16)
    module = Int8Linear(linear)
    assert not module.fast  # K=40 in bf16: torch's kernel gives garbage there
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    expected = F.linear(x, dequantize_int8(module.q, module.scale, torch.bfloat16), linear.bias)
    assert torch.equal(module(x), expected)


def test_an_unknown_dense_format_is_one_clear_error():
    with pytest.raises(OffloadError, match="dense='int4' is not supported; use int8"):
        offload.load(dense="int4")


def test_layers_the_kernel_cannot_take_are_named_in_a_warning(model_dir):
    """hidden_size 40 in bf16: the projections reduce over 40, which torch's int8 kernel cannot take."""
    path = model_dir("mixtral", hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="dequantized on every call on cpu"):
        llm = offload.load(path, device="cpu", dense="int8")
    assert torch.isfinite(llm.logits([[1, 2, 3]])).all()
