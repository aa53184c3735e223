"""A small umT5-style tokenizer for the demo weights, built offline and deterministically.

The Wan release's `google/umt5-xxl/` folder holds the SentencePiece unigram tokenizer of umT5 as
`tokenizer.json` (the fast tokenizer the reference runs), `spiece.model` and config files. The demo
folder gets the same kind of `tokenizer.json`, built with the `tokenizers` package from a fixed
vocabulary: T5's special tokens at their ids (`<pad>` 0, `</s>` 1, `<unk>` 2), every printable ASCII
character with and without the word-start marker `▁` (so any ASCII prompt tokenizes without `<unk>`),
and common English prompt words as whole pieces. Characters outside ASCII become `<unk>`.
No `spiece.model` is written (`UMT5Tokenizer.from_folder` prefers `tokenizer.json`).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIAL = ("<pad>", "</s>", "<unk>")
UNK_ID = 2
METASPACE = "\u2581"

# Whole-word pieces (unigram scores favour them over spelling a word out character by character).
_WORD_TEXT = """
a an the and or but of in on at to with without for from by as is are was be been being it its this
that these those there here his her hers him he she they them their we our you your i my me
man woman men women girl boy child person people face head eyes eye mouth lips teeth nose ears hair
beard smile smiles smiling laugh laughs laughing talk talks talking speak speaks speaking sing sings
singing look looks looking turn turns turning nod nods nodding blink blinks blinking open close
closed happy sad angry surprised calm serious neutral expression expressions emotion emotions
portrait video camera light lighting background front side left right up down slowly quickly gently
natural realistic high quality detailed sharp clear soft bright dark warm cold young old short long
black white red blue green brown blonde gray grey golden color colors colorful while then very
slightly little big small one two three many some all no not low worst bad ugly blurry blur static
still frame frames overexposed underexposed deformed disfigured distorted extra fingers hands hand
arms legs body jpeg artifacts subtitles text watermark style painting paintings picture image images
overall incomplete poorly drawn fused messy crowded walking backwards motion moving move moves movement
"""
WORDS = tuple(_WORD_TEXT.split())


def vocabulary() -> list[tuple[str, float]]:
    """(piece, log-probability score) in id order."""
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in SPECIAL]
    pieces.append((METASPACE, -9.0))
    printable = [c for c in string.printable if not c.isspace()]
    pieces += [(METASPACE + c, -9.5) for c in printable]
    pieces += [(c, -10.0) for c in printable]
    seen = {p for p, _ in pieces}
    for rank, word in enumerate(dict.fromkeys(WORDS)):
        piece = METASPACE + word
        if piece not in seen:
            pieces.append((piece, -3.0 - 0.001 * rank))
    return pieces


def build_tokenizer():
    """The `tokenizers.Tokenizer` (T5 layout: unigram model, Metaspace, `$A </s>` post-processor)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(vocabulary(), UNK_ID, False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(list(SPECIAL))
    return tok


def write_tokenizer(folder: Path, *, vocab_size: int) -> None:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` in `folder`; the
    vocabulary must fit the text encoder's embedding (`vocab_size` rows)."""
    tok = build_tokenizer()
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"the demo tokenizer has {tok.get_vocab_size()} pieces, more than the text encoder's "
            f"vocab_size {vocab_size}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n")
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {**special, "model_max_length": 512, "tokenizer_class": "T5Tokenizer", "extra_ids": 0}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["build_tokenizer", "vocabulary", "write_tokenizer"]
