"""Tiny random models of every supported family, built and saved with
transformers (the oracle), plus a small byte-level BPE tokenizer so text,
chat and streaming paths run too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

# Tiny models gain nothing from intra-op threads, and OpenMP's spinning threads
# slow down a hundredfold when another process holds the other core.
torch.set_num_threads(1)

VOCAB = 320
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "Héllo wörld, naïve café; 東京 and 日本語; emoji 🙂🚀 and ünïcödé everywhere.",
] * 20

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       head_dim=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2)),
}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def save_model(path: Path, family: str, seed: int = 0, fused: bool = False, shard: str | None = None,
               dtype: torch.dtype = torch.float32, **overrides) -> Path:
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    kwargs = {"save_original_format": False} if fused else {}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(path, **kwargs)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(family, **config overrides) -> a saved tiny model, built once per distinct request."""
    built: dict[str, Path] = {}

    def make(family: str, **kwargs) -> Path:
        key = family + json.dumps(kwargs, sort_keys=True, default=str)
        if key not in built:
            built[key] = save_model(tmp_path_factory.mktemp(family), family, **kwargs)
        return built[key]

    return make


def reference(path: Path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def reference_greedy(ref, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(autouse=True)
def untimed_prediction(monkeypatch):
    """Predictors are not weighed against their own run time here (offload/prefetch.py, TIMED): tiny
    experts read in microseconds, so predicting would never pay and prefetch counts would vary by machine."""
    import offload.prefetch

    monkeypatch.setattr(offload.prefetch, "TIMED", False)
