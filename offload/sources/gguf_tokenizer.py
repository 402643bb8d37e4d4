"""A GGUF file's tokenizer (tokenizer.ggml.*) as the `tokenizers` library's tokenizer.json and a
tokenizer_config.json: byte-level BPE ("gpt2", with the pre-tokenizer split llama.cpp uses for
tokenizer.ggml.pre) and SentencePiece ("llama", merges rebuilt from the scores); special
tokens, add_bos and the chat template; and the ids generation ends on."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gguf import GGUFSource

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# How byte-level vocabularies cut text into words before BPE (tokenizer.ggml.pre), as llama.cpp does.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT,
              "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT}
GPT2_PRES = (None, "default", "gpt-2", "gpt2", "olmo")  # GPT-2's own split
# Besides eos, the tokens llama.cpp also ends a generation on when the vocabulary has them as control tokens.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|end_of_text|>",
               "<|eom_id|>", "<EOT>")


def special_ids(src: GGUFSource) -> dict:
    out = {}
    bos, eos = src.get("tokenizer.ggml.bos_token_id"), src.get("tokenizer.ggml.eos_token_id")
    if bos is not None:
        out["bos_token_id"] = int(bos)
    ends = [int(i) for i in (eos, src.get("tokenizer.ggml.eot_token_id"), src.get("tokenizer.ggml.eom_token_id"))
            if i is not None]
    tokens, types = src.get("tokenizer.ggml.tokens") or [], src.get("tokenizer.ggml.token_type") or []
    ends += [i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_TURN]
    ends = list(dict.fromkeys(ends))
    if ends:
        out["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return out


def tokenizer_files(src: GGUFSource, echo=None) -> tuple[str, dict] | None:
    """(tokenizer.json text, tokenizer_config.json dict) from the file's tokenizer.ggml.* keys, or None
    when it has none we can rebuild (the model then takes token ids only)."""
    from tokenizers import AddedToken, processors

    kind = src.get("tokenizer.ggml.model")
    tokens = src.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        if echo is not None:
            echo(f"note: {src.files[0].name} has no tokenizer this runtime can rebuild (tokenizer.ggml.model = "
                 f"{kind!r}; supported: gpt2, llama); pass token ids instead of text")
        return None
    types = list(src.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "gpt2":
        tok = _byte_level(src, vocab, echo)
    else:
        tok = _sentencepiece(src, tokens, types, vocab)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token(key):
        i = src.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(src.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(src.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head, tail = [bos] if add_bos else [], [eos] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=head + ["$A"] + tail, pair=head + ["$A"] + tail + head + ["$B:1"] + tail,
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(head + tail)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
              "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False}
    template = src.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok.to_str(), {k: v for k, v in config.items() if v is not None}


def _byte_level(src: GGUFSource, vocab: dict, echo):
    """GPT-2 style byte-level BPE: the vocabulary is already spelled in GPT-2's byte alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in src.get("tokenizer.ggml.merges") or []]
    pre = src.get("tokenizer.ggml.pre")
    split = PRE_SPLITS.get(pre)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=split is LLAMA3_SPLIT))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in GPT2_PRES and echo is not None:
            echo(f"note: {src.files[0].name}'s pre-tokenizer {pre!r} is unknown here; splitting text as GPT-2 does")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(src: GGUFSource, tokens: list[str], types: list[int], vocab: dict):
    """SentencePiece BPE with byte fallback (Llama, Mistral, Mixtral). The file gives scores, not
    merges: SentencePiece (and llama.cpp) merge the adjacent pair whose joined piece scores highest,
    so the merges are every split of a piece into two pieces, ranked by the joined piece's score."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    merges = [tuple(m.split(" ", 1)) for m in src.get("tokenizer.ggml.merges") or []]
    if not merges:
        scores = src.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        pieces = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED) and vocab.get(t) == i}
        found = []
        for piece, i in pieces.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in pieces and right in pieces:
                    found.append((-scores[i], i, pieces[left], left, right))
        merges = [(left, right) for *_, left, right in sorted(found)]
    unk = src.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk)] if unk is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(src.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp (like SentencePiece) puts a "▁" before the text, even one starting with a space, and
    # again after every special token: a normalizer, which runs on each piece between special tokens.
    spaces = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else []) + spaces)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return tok
