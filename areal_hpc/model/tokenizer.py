"""Tokenizers behind one small protocol, so the engine and trainer never care which one they hold.

The quickstart cannot download a real tokenizer, so it uses a character-level one saved next to the
tiny model's weights; real checkpoints (Qwen2.5, Llama) go through HF ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

CHAR_TOKENIZER_FILE = "char_tokenizer.json"


class Tokenizer(Protocol):
    pad_id: int
    eos_id: int
    bos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
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


class HFTokenizer:
    """Adapter over a ``transformers`` tokenizer loaded from a local checkpoint."""

    def __init__(self, directory: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(directory))
        self.eos_id = int(self._tok.eos_token_id)
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id)
        self.bos_id = self._tok.bos_token_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self._tok.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The char tokenizer if the checkpoint carries one, else the checkpoint's HF tokenizer."""
    if Path(directory, CHAR_TOKENIZER_FILE).exists():
        return CharTokenizer.load(directory)
    return HFTokenizer(directory)
