"""Sub-sentence splitting for NAFS's locality-constrained BERT.

A caption is cut into sub-sentences at commas and sentence punctuation; each sub-sentence is then
mapped onto the WordPiece tokens it covers so a model can restrict attention to within it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tbps.text.tokenizers import WordPieceTokenizer

__all__ = ["split_sub_sentences", "sub_sentence_masks", "sub_sentence_token_spans", "token_span_masks"]

# A run of delimiters ends a sub-sentence only when followed by whitespace or the end of the
# caption, so "3.5" and "1,000" stay whole (glued "shirt.His" needs normalize_caption first); a
# period closing a dotted abbreviation ("e.g.", "U.S.") is not a boundary either.
_DELIMITER_RUN = re.compile(r"(?<!\.\w)[,;.!?]+(?=\s|$)")
_WORD_CHAR = re.compile(r"\w")


def split_sub_sentences(caption: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the caption's sub-sentences, trailing delimiter included.

    Leading/trailing whitespace is excluded from each span; a piece without any word character
    (a stray ", ,") is merged into its neighbour, so no span is empty. A blank caption gives [].
    """
    pieces: list[tuple[int, int]] = []
    start = 0
    for match in _DELIMITER_RUN.finditer(caption):
        pieces.append((start, match.end()))
        start = match.end()
    pieces.append((start, len(caption)))

    spans: list[tuple[int, int]] = []
    pending_start: int | None = None  # start of word-less pieces seen before the first real one
    for piece_start, piece_end in pieces:
        text = caption[piece_start:piece_end]
        stripped = text.strip()
        if not stripped:
            continue
        lo = piece_start + (len(text) - len(text.lstrip()))
        hi = piece_start + len(text.rstrip())
        if not _WORD_CHAR.search(stripped):
            if spans:
                spans[-1] = (spans[-1][0], hi)
            elif pending_start is None:
                pending_start = lo
            continue
        if pending_start is not None:
            lo, pending_start = pending_start, None
        spans.append((lo, hi))
    if not spans and pending_start is not None:
        spans.append((pending_start, len(caption.rstrip())))
    return spans


def sub_sentence_token_spans(
    offsets: Sequence[Sequence[int]] | torch.Tensor, sub_spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Token index spans [start, end) covering each character span in ``sub_spans``.

    ``offsets`` is a tokenizer's offset mapping for one caption (special and padding tokens have an
    empty span such as (0, 0) and are skipped). A token belongs to the sub-sentence containing its
    first character. Sub-sentences with no token (cut off by truncation) are dropped; truncation only
    removes the tail, so output ``i`` still corresponds to ``sub_spans[i]``.
    """
    pairs = offsets.tolist() if isinstance(offsets, torch.Tensor) else [tuple(p) for p in offsets]
    starts = [span[0] for span in sub_spans]
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for index, (char_start, char_end) in enumerate(pairs):
        if char_end <= char_start:
            continue
        which = bisect.bisect_right(starts, char_start) - 1
        if which < 0 or char_start >= sub_spans[which][1]:
            continue  # token outside every sub-sentence (e.g. between non-tiling spans)
        first.setdefault(which, index)
        last[which] = index
    return [(first[i], last[i] + 1) for i in range(len(sub_spans)) if i in first]


def sub_sentence_masks(
    tokenizer: WordPieceTokenizer, captions: Sequence[str], max_sub_sentences: int
) -> dict[str, torch.Tensor]:
    """Sub-sentence token spans aligned with ``tokenizer(captions)``.

    Returns ``token_spans`` [B x S x 2] (S = max_sub_sentences, padding spans = (0, 0)),
    ``num_sub_sentences`` [B], and the ``input_ids`` / ``attention_mask`` they index into.
    Sub-sentences beyond ``max_sub_sentences`` or fully truncated away are dropped.
    """
    if max_sub_sentences < 1:
        raise ValueError(f"max_sub_sentences must be >= 1, got {max_sub_sentences}")
    batch = list(captions)
    encoded = tokenizer(batch)
    token_spans = torch.zeros((len(batch), max_sub_sentences, 2), dtype=torch.long)
    counts = torch.zeros(len(batch), dtype=torch.long)
    for row, caption in enumerate(batch):
        spans = sub_sentence_token_spans(encoded["offsets"][row], split_sub_sentences(caption))
        spans = spans[:max_sub_sentences]
        if spans:
            token_spans[row, : len(spans)] = torch.tensor(spans, dtype=torch.long)
        counts[row] = len(spans)
    return {
        "token_spans": token_spans,
        "num_sub_sentences": counts,
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
    }


def token_span_masks(token_spans: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean masks [B x S x length] that are True inside each [start, end) span of ``token_spans``."""
    positions = torch.arange(length, device=token_spans.device)
    start = token_spans[..., 0].unsqueeze(-1)
    end = token_spans[..., 1].unsqueeze(-1)
    return (positions >= start) & (positions < end)
