"""Tokenizers behind one small protocol, so the engine and trainer never care which one they hold.

The quickstart cannot download a real tokenizer, so it uses a character-level one saved next to the
tiny model's weights; real checkpoints (Qwen2.5, Llama) go through HF ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
ID_TOKENIZER_FILE = "id_tokenizer.json"
# Qwen2's <|endoftext|>: its eos and pad id, kept so random-weight presets stop and pad where Qwen2 would.
QWEN2_EOS_ID = 151643


class Tokenizer(Protocol):
    """``stop_ids``: the ids that end a response (the EOS id, and for chat checkpoints every id their
    generation config lists, e.g. ``<|im_end|>`` and ``<|endoftext|>``). ``chat_template``: whether
    :meth:`apply_chat` can format a conversation (only HF tokenizers that ship a template)."""

    pad_id: int
    eos_id: int
    bos_id: int | None
    vocab_size: int
    stop_ids: frozenset[int]
    chat_template: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]: ...


class _NoChat:
    """The tokenizers of the toy and random models: no chat template, EOS the only stop."""

    chat_template = False
    eos_id: int

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset((self.eos_id,))

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]:
        raise ValueError(f"{type(self).__name__} has no chat template; set prompt.format=raw")


class CharTokenizer(_NoChat):
    """One token per character of a fixed alphabet, plus pad/bos/eos."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, alphabet: str) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._to_id = {c: i + len(self.SPECIALS) for i, c in enumerate(alphabet)}
        self._to_char = {i: c for c, i in self._to_id.items()}
        self.vocab_size = len(self.SPECIALS) + len(alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._to_id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self._to_char.get(int(i), "") for i in ids)

    def save(self, directory: str | Path) -> None:
        Path(directory, CHAR_TOKENIZER_FILE).write_text(json.dumps({"alphabet": self.alphabet}))

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        return cls(json.loads(Path(directory, CHAR_TOKENIZER_FILE).read_text())["alphabet"])


class IdTokenizer(_NoChat):
    """Text is the ids written as decimal numbers: for random-weight models, whose tokens mean nothing.

    It saves with the checkpoint like :class:`CharTokenizer`, so a random preset loads through the same
    path as every other policy and its logged responses read as the ids themselves.
    """

    def __init__(self, vocab_size: int, eos_id: int, pad_id: int | None = None, bos_id: int | None = None) -> None:
        pad_id = eos_id if pad_id is None else pad_id
        for name, i in (("eos_id", eos_id), ("pad_id", pad_id), ("bos_id", bos_id)):
            if i is not None and not 0 <= i < vocab_size:
                raise ValueError(f"{name}={i} is outside the vocabulary of {vocab_size} ids")
        self.vocab_size, self.eos_id, self.pad_id, self.bos_id = vocab_size, eos_id, pad_id, bos_id

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise ValueError(f"an id tokenizer encodes space-separated integers, got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary of {self.vocab_size} ids")
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def save(self, directory: str | Path) -> None:
        Path(directory, ID_TOKENIZER_FILE).write_text(json.dumps(
            {"vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id}))

    @classmethod
    def load(cls, directory: str | Path) -> IdTokenizer:
        return cls(**json.loads(Path(directory, ID_TOKENIZER_FILE).read_text()))


class HFTokenizer:
    """Adapter over a ``transformers`` tokenizer loaded from a local checkpoint.

    Stop ids are the tokenizer's EOS plus every ``eos_token_id`` of the checkpoint's
    ``generation_config.json``: chat models end a turn with a token (``<|im_end|>``, ``<|eot_id|>``) that
    is not always the tokenizer's EOS, and a response that runs past it would be scored on garbage.
    """

    def __init__(self, directory: str | Path | None = None, *, tokenizer=None) -> None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self._tok = tokenizer
        if self._tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {directory} has no EOS token; set eos_token in its "
                             f"tokenizer_config.json so responses can end")
        self.eos_id = int(self._tok.eos_token_id)
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id)
        self.bos_id = self._tok.bos_token_id
        self.vocab_size = len(self._tok)
        self.chat_template = bool(getattr(self._tok, "chat_template", None))
        stops = {self.eos_id}
        if directory is not None:
            stops |= _generation_stops(Path(directory))
        self.stop_ids = frozenset(stops)

    @classmethod
    def wrap(cls, tokenizer) -> HFTokenizer:
        """An adapter over a tokenizer already in memory (e.g. read from a GGUF file)."""
        return cls(tokenizer=tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation through the checkpoint's chat template, ending with the assistant's turn opened."""
        if not self.chat_template:
            raise ValueError("this checkpoint's tokenizer has no chat template (no chat_template in its "
                             "tokenizer_config.json); set prompt.format=raw or use a chat checkpoint")
        out = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)]

    def save(self, directory: str | Path) -> None:
        self._tok.save_pretrained(str(directory))


def _generation_stops(directory: Path) -> set[int]:
    """``eos_token_id`` of the checkpoint's generation config (an int or a list), if it has one."""
    f = directory / "generation_config.json"
    if not f.is_file():
        return set()
    try:
        eos = json.loads(f.read_text()).get("eos_token_id")
    except (OSError, ValueError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}); fix or delete it") from None
    if eos is None:
        return set()
    return {int(i) for i in (eos if isinstance(eos, list) else [eos])}


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The char or id tokenizer if the checkpoint carries one, else the checkpoint's HF tokenizer."""
    if Path(directory, CHAR_TOKENIZER_FILE).exists():
        return CharTokenizer.load(directory)
    if Path(directory, ID_TOKENIZER_FILE).exists():
        return IdTokenizer.load(directory)
    return HFTokenizer(directory)


def initial_tokenizer(model_cfg, alphabet: str) -> Tokenizer:
    """The tokenizer the initial policy of ``model_cfg`` carries, known before any checkpoint exists.

    Token-level tasks draw prompt ids from its vocabulary: the tiny model's characters of the task's
    ``alphabet``, a random preset's full vocabulary, or a local checkpoint's own tokenizer.
    """
    if model_cfg.kind == "tiny":
        return CharTokenizer(alphabet)
    if model_cfg.kind == "random":
        from areal_hpc.model.presets import PRESETS

        if model_cfg.preset not in PRESETS:
            raise ValueError(f"unknown model.preset {model_cfg.preset!r}; choose one of {sorted(PRESETS)}")
        return IdTokenizer(PRESETS[model_cfg.preset]["vocab_size"], eos_id=QWEN2_EOS_ID)
    return load_tokenizer(Path(model_cfg.path).expanduser())
