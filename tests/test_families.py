"""Every family against transformers: logits, greedy tokens, batches, dtypes, checkpoint layouts."""

import pytest
import torch

import offload
from conftest import FAMILIES, reference, reference_greedy

EOS = 2


def assert_greedy_matches(llm, ref, prompt, n=32):
    """Our greedy tokens equal the reference's; we may stop earlier only at an EOS the reference also produced."""
    ours = llm.generate(prompt, max_new_tokens=n)
    theirs = reference_greedy(ref, prompt, n)
    assert ours.token_ids == theirs[: len(ours.token_ids)]
    if len(ours.token_ids) < n:
        assert ours.finish_reason == "eos" and theirs[len(ours.token_ids)] == EOS
    return ours


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_greedy_match_transformers(model_dir, family):
    path = model_dir(family)
    llm, ref = offload.load(path, device="cpu"), reference(path)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = llm.logits(ids)
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    assert ours.dtype == torch.float32 and ours.shape == (2, 24, 320)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert_greedy_matches(llm, ref, [1, 17, 42, 99, 5])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batch_of_two_prompts_matches_each_alone(model_dir, family):
    path = model_dir(family)
    llm, ref = offload.load(path, device="cpu"), reference(path)
    prompts = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 200, 201]]  # different lengths: left padding
    batch = llm.generate(prompts, max_new_tokens=16)
    assert len(batch) == 2
    for prompt, result in zip(prompts, batch):
        theirs = reference_greedy(ref, prompt, 16)
        assert result.token_ids == theirs[: len(result.token_ids)]
        assert len(result.token_ids) == 16 or theirs[len(result.token_ids)] == EOS


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("mixtral", dict(sliding_window=5)),  # window shorter than the sequence
        ("mixtral", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                                   "factor": 2.0})),
        ("qwen2_moe", dict(mlp_only_layers=[0], norm_topk_prob=True)),  # a dense layer and renormalised top-k
        ("qwen3_moe", dict(decoder_sparse_step=2, num_hidden_layers=3)),  # only layer 1 is sparse
        ("olmoe", dict(clip_qkv=0.5)),
        ("mixtral", dict(fused=True)),  # transformers' fused expert names on disk
        ("qwen3_moe", dict(fused=True)),
        ("olmoe", dict(shard="30KB")),  # several shards and an index
    ],
)
def test_config_variants_and_layouts(model_dir, family, overrides):
    path = model_dir(family, **overrides)
    llm, ref = offload.load(path, device="cpu"), reference(path)
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    assert (llm.logits(ids) - theirs).abs().max().item() <= 1e-4
    assert_greedy_matches(llm, ref, [1, 9, 8, 7], n=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(model_dir, dtype):
    path = model_dir("qwen2_moe", dtype=dtype)
    ref = reference(path, dtype=torch.float32)  # fp32 upcast of the same weights
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    exact = offload.load(path, device="cpu", dtype="float32")
    assert (exact.logits(ids) - theirs).abs().max().item() <= 1e-4
    native = offload.load(path, device="cpu")  # bf16 stays bf16; fp16 computes in fp32 on the CPU
    assert native.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    scale = theirs.abs().max().item()
    assert (native.logits(ids) - theirs).abs().max().item() <= 0.05 * scale


def test_text_prompt_and_chat(model_dir):
    path = model_dir("mixtral")
    llm = offload.load(path, device="cpu")
    hf_tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(path)
    result = llm.generate("To be, or not", max_new_tokens=8)
    assert llm.tokenizer.encode("To be, or not") == hf_tok("To be, or not")["input_ids"]
    assert result.text == hf_tok.decode(result.token_ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "Héllo 🙂"}]
    assert llm.tokenizer.encode_chat(messages) == hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                              tokenize=True, return_dict=False)
    reply = llm.chat(messages, max_new_tokens=6)
    assert reply.stats.prompt_tokens == len(llm.tokenizer.encode_chat(messages))
    assert "".join(llm.chat(messages, max_new_tokens=6, stream=True)) == reply.text
    assert llm.stats.requests == 3 and llm.stats.as_dict()["new_tokens"] > 0
