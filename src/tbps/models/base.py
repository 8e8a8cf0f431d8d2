"""The method interface shared by the trainer, the evaluator and the search index.

Every method (baseline, NAFS, ACSA, ISANet, LAIP, and any fifth one) subclasses
:class:`PersonSearchMethod` and is registered with ``@register_method``. The rest of tbps talks
to methods only through this interface:

* ``build_text_processor()`` returns a picklable callable turning captions into the tensors
  ``encode_text`` expects (it runs inside data-loader workers);
* ``encode_image(images)`` / ``encode_text(text_batch)`` return :data:`Features`: a dict of
  tensors, batch first, with at least ``"global"`` (the vector indexed by FAISS for stage 1);
  local sets (regions, phrases, tokens) ride along under other keys;
* ``similarity(text_features, image_features)`` scores every text against every image (global
  cosine by default); ``score_candidates`` scores each text against its own candidate images,
  which is what two-stage retrieval needs;
* ``forward(batch)`` returns a dict of named, already weighted losses; their sum is optimised.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Features = dict[str, Tensor]
TextProcessor = Callable[[Sequence[str]], dict[str, Tensor]]

# Parameters whose qualified name starts with one of these belong to a pretrained backbone and
# get the backbone learning rate; everything else is a new layer.
BACKBONE_PREFIXES = ("image_backbone.", "text_backbone.")


def index_features(features: Mapping[str, Tensor], index: Tensor | slice) -> Features:
    """Select the same rows of every tensor in a feature dict."""
    return {key: value[index] for key, value in features.items()}


def concat_features(chunks: Sequence[Mapping[str, Tensor]]) -> Features:
    """Concatenate feature dicts along the batch dimension."""
    if not chunks:
        raise ValueError("no feature chunks to concatenate")
    return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}


def pool_tokens(tokens: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Pool features [B x L x H] over their valid rows (mask 1, e.g. real tokens): "cls" (row 0), "mean" or "max"."""
    if mode == "cls":
        return tokens[:, 0]
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    if mode == "mean":
        return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if mode == "max":
        return tokens.masked_fill(weights == 0, float("-inf")).max(1).values
    raise ValueError(f"unknown text pooling {mode!r}; use cls, mean or max")


def _identity_gather(tensor: Tensor) -> Tensor:
    return tensor


class PersonSearchMethod(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every text-based person search method."""

    method_name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Whether score_candidates adds something over the global cosine (two-stage retrieval is
    # then worth running by default).
    has_fine_similarity: ClassVar[bool] = False

    def __init__(self, config: Any, num_classes: int, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_classes = int(num_classes)
        self.image_size = tuple(image_size) if image_size is not None else None
        # Replaced by the training engine under DDP with an all-gather that keeps gradients, so
        # batch-level losses (CMPM, ITC, ...) see every process's samples.
        self.gather: Callable[[Tensor], Tensor] = _identity_gather

    # ----------------------------------------------------------------- text input
    def fit_text(self, captions: Sequence[str]) -> None:
        """Called once with all training captions before training (e.g. to build a vocabulary)."""

    @abc.abstractmethod
    def build_text_processor(self) -> TextProcessor:
        """A picklable callable: captions -> the tensors :meth:`encode_text` takes."""

    # ----------------------------------------------------------------- encoders
    @abc.abstractmethod
    def encode_image(self, images: Tensor) -> Features:
        """Images [B x 3 x H x W] -> features with at least ``"global"`` [B x D]."""

    @abc.abstractmethod
    def encode_text(self, text: Mapping[str, Tensor]) -> Features:
        """Text tensors from the text processor -> features with at least ``"global"``."""

    @property
    def image_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Normalisation matching the image backbone's pretraining."""
        backbone = getattr(self, "image_backbone", None)
        if backbone is None:
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        return backbone.mean, backbone.std

    # ----------------------------------------------------------------- similarity
    @staticmethod
    def global_similarity(text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor]) -> Tensor:
        """Cosine similarity of the global vectors, [texts x images] (stage 1 of retrieval)."""
        text = F.normalize(text_features["global"].float(), dim=-1)
        image = F.normalize(image_features["global"].float(), dim=-1)
        return text @ image.t()

    def similarity(self, text_features: Mapping[str, Tensor], image_features: Mapping[str, Tensor]) -> Tensor:
        """The method's test-time similarity of every text to every image, [texts x images]."""
        return self.global_similarity(text_features, image_features)

    def score_candidates(
        self,
        text_features: Mapping[str, Tensor],
        image_features: Mapping[str, Tensor],
        candidates: Tensor,
    ) -> Tensor:
        """Score text ``t`` against its own candidate images ``candidates[t]`` -> [texts x k].

        The default runs :meth:`similarity` once per text on its candidates; methods with
        pairwise heads (cross-attention, ITM) override it with a batched version.
        """
        rows = []
        for row, candidate_row in enumerate(candidates):
            text = index_features(text_features, slice(row, row + 1))
            rows.append(self.similarity(text, index_features(image_features, candidate_row))[0])
        return torch.stack(rows) if rows else candidates.new_zeros((0, candidates.shape[1]), dtype=torch.float32)

    def explain(self, image: Tensor, text: str) -> tuple[list[str], Tensor] | None:
        """The method's own evidence of which image regions match which phrases of ``text``.

        ``image`` is one normalised image [3 x H x W]. Methods with an attention of their own
        return ``(phrases, maps)`` with ``maps`` [phrases x h x w], non-negative; ``None`` (the
        default) means the method has none and search explains hits generically (occlusion).
        """
        return None

    def visualize(self, image: Tensor, text: str) -> dict[str, tuple[list[str], Tensor]] | None:
        """The method's attention figure for one normalised image [3 x H x W] and one caption.

        An ordered mapping row title -> ``(labels, maps)``, ``maps`` [labels x h x w] and
        non-negative, one panel per label (``tbps explain`` draws it). The default is the single
        row of :meth:`explain`; methods override it with the figures of their papers. ``None``:
        the method has no attention of its own.
        """
        explained = self.explain(image, text)
        return None if explained is None else {"attention": explained}

    # ----------------------------------------------------------------- training
    @abc.abstractmethod
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Return the named, weighted training losses for one batch."""

    def set_epoch(self, epoch: int) -> None:
        """Called by the engine at the start of every training epoch (for staged schedules)."""

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Split trainable parameters into pretrained-backbone and new layers.

        A backbone that has no pretrained weights by design (``trained_from_scratch``, e.g. the
        Bi-LSTM over the training vocabulary) starts from random weights like the method's own
        layers, so it trains at their rate, as the papers that use one do (ISANet: the visual
        backbone at 1e-3, "the rest of the network" at 1e-2)."""
        from_scratch = {
            id(parameter)
            for module in self.modules()
            if getattr(module, "trained_from_scratch", False)
            for parameter in module.parameters()
        }
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "new": []}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                pretrained = name.startswith(BACKBONE_PREFIXES) and id(parameter) not in from_scratch
                groups["backbone" if pretrained else "new"].append(parameter)
        return groups
