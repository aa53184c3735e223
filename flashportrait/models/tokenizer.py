"""The umT5 tokenizer as the pipeline calls it: pad to 512 with a mask, EOS appended, truncation.

The Wan release ships the `google/umt5-xxl` tokenizer folder (`tokenizer.json`, `spiece.model`,
config files). The reference calls `AutoTokenizer(...)(prompts, padding="max_length",
max_length=512, truncation=True, add_special_tokens=True)`, which for this folder is the fast T5
tokenizer built from `tokenizer.json`: the SentencePiece ids of the text, cut to `max_length - 1`,
then `</s>` (id 1), then `<pad>` (id 0) up to `max_length`, and a mask that is 1 on the text and the
EOS. We reproduce that with the `tokenizers` package on `tokenizer.json`, or with `sentencepiece` on
`spiece.model` when a folder has only that (the same vocabulary and normalisation; the fast
tokenizer is preferred because it is what the reference ran). No text cleaning is applied: the
FlashPortrait pipeline passes prompts to the tokenizer unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_LENGTH = 512


class TokenizerError(RuntimeError):
    """A tokenizer folder or file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class TokenizedBatch:
    """input_ids: [B, max_length] int64; attention_mask: [B, max_length] int64 (1 = token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """[B] int64: real token count of each prompt, EOS included."""
        return self.attention_mask.gt(0).sum(dim=1)


class UMT5Tokenizer:
    """Text -> padded ids. `encode_text(text) -> list[int]` gives the ids without special tokens."""

    def __init__(
        self,
        encode_text: Callable[[str], list[int]],
        *,
        pad_id: int,
        eos_id: int,
        max_length: int = MAX_LENGTH,
        source: str = "tokenizer",
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self._encode_text = encode_text
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_length = max_length
        self.source = source

    @classmethod
    def from_folder(cls, folder: str | Path, *, max_length: int = MAX_LENGTH) -> UMT5Tokenizer:
        """A `google/umt5-xxl`-style folder: `tokenizer.json` if present, else `spiece.model`."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json", max_length=max_length)
        if (folder / "spiece.model").is_file():
            return cls.from_sentencepiece(folder / "spiece.model", max_length=max_length)
        raise TokenizerError(
            f"{folder} holds neither tokenizer.json nor spiece.model (the google/umt5-xxl files)"
        )

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, *, max_length: int = MAX_LENGTH) -> UMT5Tokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers package raises plain Exceptions for bad files
            raise TokenizerError(f"{path} is not a readable tokenizer.json: {exc}") from exc
        # Truncation, padding and the EOS are ours to apply (see `__call__`), whatever the file says.
        tok.no_truncation()
        tok.no_padding()
        pad_id, eos_id = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
        if pad_id is None or eos_id is None:
            raise TokenizerError(f"{path} has no '<pad>' or '</s>' token; it is not a T5 tokenizer")

        def encode_text(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids

        return cls(encode_text, pad_id=pad_id, eos_id=eos_id, max_length=max_length, source=str(path))

    @classmethod
    def from_sentencepiece(cls, path: str | Path, *, max_length: int = MAX_LENGTH) -> UMT5Tokenizer:
        import sentencepiece

        path = Path(path)
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{path} is not a readable SentencePiece model: {exc}") from exc
        pad_id, eos_id = sp.pad_id(), sp.eos_id()
        if pad_id < 0 or eos_id < 0:
            raise TokenizerError(
                f"{path} defines no pad or eos id (pad {pad_id}, eos {eos_id}); not a T5 model"
            )

        def encode_text(text: str) -> list[int]:
            return list(sp.EncodeAsIds(text))

        return cls(encode_text, pad_id=pad_id, eos_id=eos_id, max_length=max_length, source=str(path))

    def ids(self, text: str) -> list[int]:
        """Ids of one prompt as the model sees them: text ids cut to max_length - 1, then EOS."""
        return [*self._encode_text(text)[: self.max_length - 1], self.eos_id]

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedBatch:
        """One prompt or several -> [B, max_length] ids and mask (padding on the right)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to tokenize")
        input_ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), self.max_length), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {row} is a {type(prompt).__name__}, expected a string")
            ids = self.ids(prompt)
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            mask[row, : len(ids)] = 1
        return TokenizedBatch(input_ids=input_ids, attention_mask=mask)
