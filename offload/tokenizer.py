"""tokenizer.json through `tokenizers`, chat templates through jinja2 the way
transformers renders them, and streaming decode through `DecodeStream` (which
never yields half a UTF-8 character)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import OffloadError


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    def __init__(self, model_dir: Path):
        path = Path(model_dir) / "tokenizer.json"
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise OffloadError(f"cannot read {path} ({exc}); re-download the tokenizer files") from None
        config_path = Path(model_dir) / "tokenizer_config.json"
        config = {}
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise OffloadError(f"{config_path} is not valid UTF-8 JSON ({exc}); re-download it") from None
            if not isinstance(config, dict):
                raise OffloadError(f"{config_path} should hold a JSON object; re-download it")
        self.special = {
            key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.chat_template = self._find_template(Path(model_dir), config)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _find_template(model_dir: Path, config: dict) -> str | None:
        # transformers 5 saves the template beside the config as chat_template.jinja
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.exists():
            try:
                return jinja_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise OffloadError(f"{jinja_file} is not UTF-8 text ({exc}); re-download it") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.hf.token_to_id(text)

    def decode_stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise OffloadError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise OffloadError("messages must be a list of {'role': str, 'content': str} dicts")
        if not messages:
            raise OffloadError("messages is empty; give at least one {'role': 'user', 'content': ...} message")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special
            )
        except jinja2.exceptions.TemplateError as exc:
            raise OffloadError(f"the chat template rejected these messages: {exc}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the special tokens itself, so none are added here (as transformers does).
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


class StreamDecoder:
    """Token ids in, printable text pieces out; skips special tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer.hf, token_id) or ""
