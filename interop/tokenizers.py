"""Tokenizers of Hugging Face and Tessera directories behind the `data.Tokenizer` interface.

SentencePieceTokenizer is a data.Tokenizer; HFTokenizer wraps tokenizer.json. Both expose what
data.Tokenizer has: .vocab_size, .encode(str) -> list[int],
.encode_batch(list[str]) -> list[list[int]], .decode(list[int]) -> str, .bos_id, .eos_id, .pad_id
(0 when the tokenizer defines no pad, as data.Tokenizer: padded positions are masked anyway),
.path; plus .eos_ids (every stop id from tokenizer_config/generation_config), .token_bytes()
(UTF-8 bytes per id, for bits-per-byte), .chat_template (jinja source or None) and
.apply_chat_template(messages, add_generation_prompt=True) -> str.

`encode` adds no special tokens (as sentencepiece's encode), so ids equal transformers'
`tokenizer.encode(text, add_special_tokens=False)`; pass add_bos=True for a leading BOS.
`.add_bos` says whether the tokenizer's own configuration starts a text with BOS (what
transformers' `tokenizer(text)` does): tokenizer_config.json's `add_bos_token` when present, else
for tokenizer.json whether its post-processor prepends the BOS, for tokenizer.model whether the
model has a BOS (as transformers' LlamaTokenizer default). It is False whenever bos_id < 0, so
`encode(text, add_bos=tok.add_bos)` is a prompt as the model's authors tokenize it.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from data.tokenizer import Tokenizer
from interop.hf_config import HFError, read_json

# Files that make up an HF tokenizer; import and export copy whichever exist.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _token(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _json_if_exists(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def read_chat_template(directory: Path, config: dict) -> str | None:
    """The default chat template: chat_template.jinja (transformers 5), chat_template.json, or the
    `chat_template` of tokenizer_config.json (a string, or a list of {name, template})."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = _json_if_exists(directory / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _configured_add_bos(config: dict) -> bool | None:
    """tokenizer_config.json's `add_bos_token`, or None when it does not say."""
    value = config.get("add_bos_token")
    return value if isinstance(value, bool) else None


def _stop_ids(directory: Path) -> list[int]:
    """eos_token_id of generation_config.json / config.json (an int or a list, as in Llama 3)."""
    for name in ("generation_config.json", "config.json"):
        value = _json_if_exists(directory / name).get("eos_token_id")
        if value is not None:
            return [value] if isinstance(value, int) else [int(v) for v in value]
    return []


class ChatTemplateMixin:
    """Chat rendering shared by both tokenizers; needs .chat_template, .bos_token, .eos_token."""

    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render `messages` ([{role, content}]) with the tokenizer's jinja template, in the same
        sandboxed environment and with the same globals transformers uses, so prompts match."""
        if not self.chat_template:
            raise HFError(f"tokenizer {self.path} has no chat_template")
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise HFError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)


class HFTokenizer(ChatTemplateMixin):
    """tokenizer.json through the `tokenizers` library, specials from tokenizer_config.json."""

    def __init__(self, directory: str | Path):
        import tokenizers
        self.directory = Path(directory)
        self.path = str(self.directory / "tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust error is one long line; keep its first sentence
            raise HFError(f"cannot read {self.path}: {str(e).splitlines()[0][:200]}") from None
        config = {**_json_if_exists(self.directory / "special_tokens_map.json"),
                  **_json_if_exists(self.directory / "tokenizer_config.json")}
        self.bos_token, self.eos_token = _token(config.get("bos_token")), _token(config.get("eos_token"))
        self.pad_token = _token(config.get("pad_token"))
        self.bos_id = self._id(self.bos_token)
        stops = _stop_ids(self.directory)
        self.eos_id = self._id(self.eos_token) if self.eos_token else (stops[0] if stops else -1)
        if not self.eos_token and self.eos_id >= 0:
            self.eos_token = self._tok.id_to_token(self.eos_id)
        self.eos_ids = tuple(dict.fromkeys([i for i in [self.eos_id] + stops if i >= 0]))
        self.pad_id = max(self._id(self.pad_token), 0)
        configured = _configured_add_bos(config)
        self.add_bos = self.bos_id >= 0 and (self._post_processor_adds_bos() if configured is None else configured)
        self.chat_template = read_chat_template(self.directory, config)

    def _post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor puts the BOS in front of a text. Asked of the
        library itself (a short text with and without special tokens) rather than read from the
        JSON, whose post-processor may be a Sequence, TemplateProcessing, RobertaProcessing..."""
        with_specials = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        return with_specials[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

    def __reduce__(self):  # pickled by path for data.prepare's worker processes
        return type(self), (self.directory,)

    def _id(self, token: str | None) -> int:
        tid = self._tok.token_to_id(token) if token else None
        return -1 if tid is None else tid

    def _byte_level(self) -> bool:
        """Whether tokens spell bytes in GPT-2's byte alphabet (Llama 3, Qwen2) rather than text."""
        return '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, int32 [V]: 0 for special tokens, 1 for <0xNN> byte
        pieces, one per character for byte-level tokens, else the piece's text ('▁' a space)."""
        out = np.zeros(self.vocab_size, np.int32)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        byte_level = self._byte_level()
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if token in special or i >= len(out):
                continue
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                out[i] = 1
            else:
                out[i] = len(token) if byte_level else len(token.replace("\u2581", " ").encode("utf-8"))
        return out

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` without special tokens (with a leading BOS when add_bos)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id >= 0 else ids

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        """Token ids of many texts (the Rust library parallelises; num_threads is for parity)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, EOS, chat markers) dropped unless asked for."""
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(ChatTemplateMixin, Tokenizer):
    """A sentencepiece tokenizer.model (Llama 2, Mistral, or one Tessera trained): data.Tokenizer
    with the chat template and special tokens of a tokenizer_config.json beside it when there is one."""

    def __init__(self, model_path: str | Path):
        super().__init__(model_path)
        self.directory = Path(model_path).parent
        config = {**_json_if_exists(self.directory / "special_tokens_map.json"),
                  **_json_if_exists(self.directory / "tokenizer_config.json")}
        piece = lambda i: self.sp.id_to_piece(i) if i >= 0 else None
        self.bos_token = _token(config.get("bos_token")) or piece(self.sp.bos_id())
        self.eos_token = _token(config.get("eos_token")) or piece(self.sp.eos_id())
        self.bos_id, self.eos_id = self._id(self.bos_token), self._id(self.eos_token)
        pad = _token(config.get("pad_token"))
        self.pad_id = max(self._id(pad) if pad else self.sp.pad_id(), 0)
        self.eos_ids = tuple(dict.fromkeys([i for i in [self.eos_id] + _stop_ids(self.directory) if i >= 0]))
        # transformers' LlamaTokenizer adds BOS unless tokenizer_config.json says otherwise.
        self.add_bos = self.bos_id >= 0 and _configured_add_bos(config) is not False
        self.chat_template = read_chat_template(self.directory, config)

    def _id(self, token: str | None) -> int:
        if not token:
            return -1
        tid = self.sp.piece_to_id(token)
        return tid if self.sp.id_to_piece(tid) == token else -1  # unknown pieces map to unk


def load_tokenizer_dir(path: str | Path):
    """The tokenizer of a directory: tokenizer.json (preferred, as transformers' fast tokenizers
    use it) or tokenizer.model. Works for HF model directories and Tessera run directories."""
    p = Path(path)
    if (p / "tokenizer.json").is_file():
        return HFTokenizer(p)
    if (p / "tokenizer.model").is_file():
        return SentencePieceTokenizer(p / "tokenizer.model")
    raise HFError(f"no tokenizer in {p}: expected tokenizer.json or tokenizer.model")


def has_tokenizer(path: str | Path) -> bool:
    """Whether `path` holds a tokenizer load_tokenizer_dir can read."""
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
