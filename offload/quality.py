"""`offload eval-quality`: how much a lossy model B (e.g. quantized experts)
departs from a reference A, measured on the same token ids of a text.

The text is tokenized once with A's tokenizer and cut into windows of
`window` tokens that overlap by one, so every token after the first is
predicted exactly once, from the tokens before it in its window (the way the
demo model's card measures its validation perplexity). Per predicted position:

  perplexity    exp(mean next-token cross-entropy), for A and for B
  KL(A || B)    sum_v pA(v) (log pA(v) - log pB(v)), in nats; mean and max
  top-1         whether A's and B's likeliest next tokens are the same

The models are loaded one after the other, never both at once: an offloaded
MoE is sized to the memory there is, and a second copy would halve it. The
price is that A's log-probabilities wait in RAM for B, tokens x vocab float32,
which `max_tokens` bounds (checked up front against the memory available).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .api import load
from .checkpoint import Checkpoint
from .demo import demo_model_path
from .errors import OffloadError
from .sources import model_directory
from .tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 20_000
DEFAULT_WINDOW = 512
# A's log-probabilities may take at most this share of the RAM available when the run starts.
LOGPROB_RAM_SHARE = 0.5


@dataclass(frozen=True)
class ModelScore:
    model: str  # as given (the demo's directory for None); `experts` tells a quantized load apart
    experts: str  # expert format: "fp32", "bf16", "int8", "int4-g32", ...
    expert_bytes: int  # one routed expert in that format (what a fetch moves)
    nll: float  # mean next-token cross-entropy, nats per token

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@dataclass(frozen=True)
class QualityReport:
    text: str  # the text file scored
    tokens: int  # predicted positions (tokens scored)
    window: int
    windows: int
    a: ModelScore  # the reference
    b: ModelScore
    kl_mean: float  # KL(A || B) per position, nats
    kl_max: float
    top1_agreement: float  # share of positions where A's and B's argmax agree

    @property
    def ratio(self) -> float:
        """B's perplexity over A's: 1.01 is 1% worse than the reference."""
        return self.b.perplexity / self.a.perplexity

    def table(self) -> str:
        rows = [("A", self.a), ("B", self.b)]
        width = max(len("model"), *(len(s.model) for _, s in rows))
        lines = [f"{self.text}: {self.tokens:,} tokens scored in {self.windows} window(s) of up to {self.window}",
                 f"   {'model':{width}}  {'experts':9} {'bytes/expert':>12} {'perplexity':>10} {'ratio':>7}"]
        for label, s in rows:
            lines.append(f"{label}  {s.model:{width}}  {s.experts:9} {s.expert_bytes:12,} {s.perplexity:10.3f} "
                         f"{s.perplexity / self.a.perplexity:7.4f}")
        lines.append(f"KL(A || B) per token: mean {self.kl_mean:.3g} nats, max {self.kl_max:.3g} nats")
        lines.append(f"top-1 agreement: {self.top1_agreement:.2%}")
        return "\n".join(lines)


def read_text(path) -> str:
    """The text file's contents, with a fix for every way it can be unusable."""
    path = Path(path).expanduser()
    if not path.exists():
        raise OffloadError(f"text file {path} does not exist; pass an existing UTF-8 text file with --text")
    if not path.is_file():
        raise OffloadError(f"{path} is not a file; pass a UTF-8 text file with --text")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OffloadError(f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                           "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def windows(ids: list[int], window: int) -> list[list[int]]:
    """Windows of at most `window` ids, overlapping by one: each id after the first is a target once."""
    out, start = [], 0
    while start < len(ids) - 1:
        out.append(ids[start:start + window])
        start += window - 1
    return out


def compare(model_a, model_b, text_file, window: int | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
            experts_b: str | None = None, progress: bool = False, echo=None, dense_b: str | None = None,
            **runtime) -> QualityReport:
    """Score `model_b` against the reference `model_a` on `text_file` (see the module docstring).

    `experts_b` loads B with that expert format (e.g. B = A's directory and "int4"), `dense_b` with
    its resident layers in that format ("int8", offload/dense.py); `max_tokens`
    caps the positions scored (None: the whole text); `runtime` goes to offload.load for both
    (device, dtype, threads, gpu_memory, ...). `echo`, if given, is told what each run loaded."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise OffloadError(f"max_tokens={max_tokens!r} (--max-tokens) must be a whole number of at least 1; "
                           "for the whole text pass None (0 on the command line)")
    text = read_text(text_file)
    path_a, path_b = (demo_model_path() if m is None else model_directory(m) for m in (model_a, model_b))
    cfg_a, cfg_b = _config(path_a), _config(path_b)
    if not (path_a / "tokenizer.json").exists():
        raise OffloadError(f"{path_a} has no tokenizer.json; the reference model A must bring the tokenizer "
                           "that the text is cut into tokens with")
    tokenizer = Tokenizer(path_a)
    _check_same_vocab(path_a, path_b, cfg_a, cfg_b, tokenizer)
    context = min(cfg_a.max_position_embeddings, cfg_b.max_position_embeddings)
    window = min(DEFAULT_WINDOW, context) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= context:
        raise OffloadError(f"window={window!r} (--window) must be a whole number from 2 to {context}, the "
                           "shorter context of the two models")

    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens + 1]  # one more: the first token is context only, never a target
    if len(ids) < 2:
        raise OffloadError(f"{text_file} makes {len(ids)} token(s); scoring needs at least 2 (one to predict "
                           "from, one to predict): give a longer text")
    chunks = windows(ids, window)
    n, vocab = len(ids) - 1, cfg_a.vocab_size
    _check_ram(n, vocab)

    # Pass 1, A alone: keep its log-probabilities for pass 2.
    logp_a = torch.empty((n, vocab), dtype=torch.float32)  # [N, V]
    with load(path_a, **runtime) as llm:
        score_a = _score(llm, model_a, path_a)
        if echo is not None:
            echo(f"A: [{llm.describe()}]")
        nll_a, at = 0.0, 0
        for chunk in _progress(chunks, progress, "A"):
            lp = torch.log_softmax(llm.logits([chunk])[0, :-1], dim=-1)  # [T-1, V]
            target = torch.tensor(chunk[1:])
            nll_a -= lp.gather(1, target[:, None]).double().sum().item()
            logp_a[at:at + len(target)] = lp
            at += len(target)
    gc.collect()  # A's weights go before B's arrive

    # Pass 2, B alone, against A's log-probabilities.
    b_runtime = dict(runtime, **{k: v for k, v in (("experts", experts_b), ("dense", dense_b)) if v is not None})
    with load(path_b, **b_runtime) as llm:
        score_b = _score(llm, model_b, path_b)
        if echo is not None:
            echo(f"B: [{llm.describe()}]")
        nll_b, kl_sum, kl_max, agree, at = 0.0, 0.0, 0.0, 0, 0
        for chunk in _progress(chunks, progress, "B"):
            lp = torch.log_softmax(llm.logits([chunk])[0, :-1], dim=-1)  # [T-1, V]
            target = torch.tensor(chunk[1:])
            ref = logp_a[at:at + len(target)]  # [T-1, V]
            nll_b -= lp.gather(1, target[:, None]).double().sum().item()
            # KL >= 0; float rounding can leave a tiny negative where the two agree almost exactly.
            kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0)  # [T-1]
            kl_sum += kl.double().sum().item()
            kl_max = max(kl_max, kl.max().item())
            agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
            at += len(target)
    return QualityReport(text=str(text_file), tokens=n, window=window, windows=len(chunks),
                         a=ModelScore(**score_a, nll=nll_a / n), b=ModelScore(**score_b, nll=nll_b / n),
                         kl_mean=kl_sum / n, kl_max=kl_max, top1_agreement=agree / n)


def _config(path: Path):
    ckpt = Checkpoint(path)
    ckpt.close()
    return ckpt.config


def _check_same_vocab(path_a, path_b, cfg_a, cfg_b, tokenizer_a) -> None:
    """B is scored on A's token ids, so the ids must mean the same tokens in both."""
    if cfg_a.vocab_size != cfg_b.vocab_size:
        raise OffloadError(f"the models have different vocabularies ({path_a}: {cfg_a.vocab_size} tokens, "
                           f"{path_b}: {cfg_b.vocab_size}); compare two versions of the same model")
    # Without a tokenizer of its own, B is taken at its config's word: the vocabulary sizes matched.
    same_dir = path_a.resolve() == path_b.resolve()
    if not same_dir and (path_b / "tokenizer.json").exists() \
            and Tokenizer(path_b).hf.get_vocab() != tokenizer_a.hf.get_vocab():
        raise OffloadError(f"{path_a} and {path_b} have different tokenizers (the same token id means "
                           "different text); compare two versions of the same model")


def _check_ram(n: int, vocab: int) -> None:
    need, available = n * vocab * 4, psutil.virtual_memory().available
    if need > LOGPROB_RAM_SHARE * available:
        fits = max(1, int(LOGPROB_RAM_SHARE * available) // (vocab * 4))
        raise OffloadError(f"keeping A's log-probabilities for {n:,} tokens x {vocab:,} vocabulary needs "
                           f"{need / 2**30:.1f} GiB of RAM but only {available / 2**30:.1f} GiB is free; "
                           f"lower max_tokens (--max-tokens) to {fits} or less")


def _score(llm, model, path: Path) -> dict:
    return {"model": os.fspath(path if model is None else model), "experts": llm.expert_format.name,
            "expert_bytes": llm.placement.expert_bytes}


def _progress(chunks, enabled: bool, label: str):
    from tqdm.auto import tqdm

    return tqdm(chunks, desc=f"scoring {label}", unit="window", disable=not enabled, leave=False)
