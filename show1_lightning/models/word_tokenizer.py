"""A vocabulary-free word-level tokenizer for the tiny offline text encoders.

Real encoders (T5's SentencePiece, CLIP's BPE) give a common word one token, so in "a red circle moving left"
the colour and the direction are one token each. The byte-level ``ByT5Tokenizer`` gives every character a token:
a colour word of another length then shifts every later byte to another position, so a colour change alters
nearly every token of the caption while a direction change alters only its last few. ``WordHashTokenizer`` keeps
one token per word (and per punctuation mark) without a vocabulary file: a word's id is a CRC-32 hash of its
lower-cased text, so every word of every prompt has an id, identical in every process.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import torch

__all__ = ["WordHashTokenizer"]

_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordHashTokenizer:
    """Words -> ids in ``[3, vocab_size)`` by hash, then EOS; pads with 0 (T5's pad / EOS / UNK ids: 0 / 1 / 2).

    Called like a ``transformers`` tokenizer for the arguments :class:`~show1_lightning.models.text_encoder.TextEncoder`
    uses (``padding="max_length"``, ``max_length``, ``truncation=True``, ``return_tensors="pt"``).
    """

    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2

    def __init__(self, vocab_size: int = 32768) -> None:
        if vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
        self.vocab_size = int(vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def token_ids(self, text: str) -> list[int]:
        """Ids of the words of ``text`` (no EOS, no padding)."""
        return [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in _WORD_RE.findall(text.lower())]

    def __call__(
        self,
        texts: Sequence[str],
        padding: str = "max_length",
        max_length: int = 77,
        truncation: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        if padding != "max_length" or return_tensors != "pt":
            raise ValueError("WordHashTokenizer pads to max_length and returns torch tensors only")
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        for i, text in enumerate(texts):
            row = self.token_ids(text)
            if len(row) + 1 > max_length:
                if not truncation:
                    raise ValueError(f"{len(row) + 1} tokens > max_length {max_length} and truncation is off")
                row = row[: max_length - 1]
            row.append(self.eos_token_id)
            ids[i, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}
