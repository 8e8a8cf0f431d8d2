"""Query an index: text or image in, ranked hits out, with optional re-ranking and explanations.

Scoring follows the evaluator (:func:`tbps.evaluation.evaluator.score_features`), so a search
ranks a gallery exactly as ``tbps eval`` ranks a test split:

* ``rerank="none"`` ranks by the method's own test score, :meth:`PersonSearchMethod.similarity`.
  When that score is the global cosine (the baseline, LAIP's ITC, any method whose
  ``has_fine_similarity`` is off) the FAISS index answers. Otherwise (ISANet's
  ``S_global + S_local``, NAFS's and ACSA's fine scores) every allowed image is scored with
  ``similarity`` on its stored features, in tiles of ``score_tile_bytes`` of features, keeping a
  running top-k: exact, and linear in the gallery size.
* ``two-stage`` is what the user asks for speed or for a pairwise head (LAIP's ITM): FAISS top-n
  by global cosine, then the method's ``score_candidates`` on those candidates through
  :func:`two_stage_similarity`.
* ``rvn`` / ``two-stage+rvn``: :func:`rvn_rerank` among the top-n candidates of the above.
"""

from __future__ import annotations

import copy
import io
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from tbps.evaluation.evaluator import RERANK_MODES
from tbps.evaluation.rerank import rvn_rerank, two_stage_similarity
from tbps.models.base import PersonSearchMethod
from tbps.search.images import (
    DEFAULT_MAX_PIXELS,
    check_max_pixels,
    decode_image,
    open_inside_roots,
    real_roots,
)
from tbps.search.index import (
    GalleryIndex,
    IndexCompatibilityError,
    check_compatible,
    image_transform,
    parse_timestamp,
    probe_feature_dim,
)

MAX_K = 1000
# Candidates re-scored by two-stage / RVN: enough to recover from stage-1 mistakes, few enough
# that fine scoring stays in the milliseconds.
DEFAULT_CANDIDATES = 100
# Filtered queries scan the allowed subset exactly when it is this small (exact and cheap);
# larger subsets go through FAISS with an ID selector.
EXACT_FILTER_LIMIT = 200_000
# Features scored per tile when the method's own score is not the global cosine: 64 MB of float32
# keeps the tile's intermediate tensors small next to the model while amortising the call.
SCORE_TILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Hit:
    """One ranked result."""

    id: int
    rank: int
    score: float
    path: str
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "rank": self.rank, "score": self.score, "path": self.path, **self.metadata}


@dataclass(frozen=True)
class SearchFilters:
    """Restrict results to some cameras and / or a time window (ISO 8601, inclusive)."""

    cameras: frozenset[str] | None = None
    time_from: str | None = None
    time_to: str | None = None

    @classmethod
    def from_value(cls, value: "SearchFilters | Mapping[str, Any] | None") -> "SearchFilters":
        """Accept ``{"camera": "c1" | [...], "time_from": ..., "time_to": ...}`` or an instance."""
        if value is None or isinstance(value, SearchFilters):
            return value or cls()
        unknown = set(value) - {"camera", "cameras", "time_from", "time_to"}
        if unknown:
            raise ValueError(f"unknown filter(s) {sorted(unknown)}; use camera, time_from, time_to")
        cameras = value.get("camera", value.get("cameras"))
        if isinstance(cameras, str):
            cameras = [cameras]
        return cls(
            cameras=frozenset(str(c) for c in cameras) if cameras else None,
            time_from=parse_timestamp(value.get("time_from")),
            time_to=parse_timestamp(value.get("time_to")),
        )

    @property
    def active(self) -> bool:
        return bool(self.cameras) or self.time_from is not None or self.time_to is not None

    def allows(self, row: Mapping[str, Any]) -> bool:
        if self.cameras and row.get("camera") not in self.cameras:
            return False
        if self.time_from is not None or self.time_to is not None:
            stamp = row.get("timestamp")
            if stamp is None:
                return False
            if self.time_from is not None and stamp < self.time_from:
                return False
            if self.time_to is not None and stamp > self.time_to:
                return False
        return True


@dataclass
class Explanation:
    """Per-phrase region relevance maps for one hit, and the rendered heatmap PNG."""

    phrases: list[str]
    maps: np.ndarray  # [phrases x grid_h x grid_w], each scaled to [0, 1]
    drops: np.ndarray  # raw relevance, same shape: similarity drops (occlusion) or the method's attention
    png: bytes = field(repr=False)


class Searcher:
    """Searches one index with the checkpoint it was built from (or a compatible one)."""

    def __init__(
        self,
        index: GalleryIndex,
        method: PersonSearchMethod,
        config: Mapping[str, Any],
        *,
        image_roots: Sequence[str | os.PathLike] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        score_tile_bytes: int = SCORE_TILE_BYTES,
    ) -> None:
        self.index = index
        self.method = method
        self.config = config
        self.image_size = tuple(int(v) for v in config["data"]["image_size"])
        self.transform = image_transform(method, self.image_size)
        self.text_processor = method.build_text_processor()
        # Image files are read only inside these folders (the index's own unless given).
        self.image_roots = image_roots
        self.max_pixels = check_max_pixels(max_pixels)
        if score_tile_bytes < 1:
            raise ValueError(f"score_tile_bytes must be >= 1, got {score_tile_bytes}")
        self.score_tile_bytes = int(score_tile_bytes)
        self._phrases = None
        self._phrase_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        *,
        strict: bool = True,
        image_roots: Sequence[str | os.PathLike] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        prompt: str | None = None,
    ) -> "Searcher":
        """Open an index with its own checkpoint, or ``checkpoint`` after checking it is compatible.

        The checkpoint may be CLIP weights (a Hugging Face CLIP folder or OpenAI's file) for an
        index built from them (zero-shot): the index records the hash of their files. ``prompt``
        (a template with ``{}`` once, e.g. ``"a photo of {}"``) is put around every query text;
        it defaults to the one the index was built with (``"{}"``: none).

        ``strict=False`` accepts a checkpoint of the same method and feature size whose weights
        differ (e.g. a later epoch of the same run), which is otherwise refused. ``image_roots``
        replaces the folders recorded in the index as the only places image files are read
        from (give them for an index you did not build yourself). The checkpoint is read with
        ``weights_only=True`` (:func:`tbps.engine.checkpoint.read_checkpoint`).
        """
        from tbps.engine.checkpoint import open_model_source

        index = GalleryIndex.open(index_dir)
        manifest = index.manifest
        path = Path(checkpoint) if checkpoint is not None else Path(manifest["checkpoint"])
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} not found; pass the checkpoint the index was built with")
        if prompt is None:  # the index's own template (zero-shot indexes record it in their config)
            prompt = ((manifest.get("config") or {}).get("model") or {}).get("prompt")
        loaded = open_model_source(path, prompt, image_size=manifest.get("image_size"))
        method, config = loaded.method, loaded.config
        dim = probe_feature_dim(method, config["data"]["image_size"])
        check_compatible(manifest, method, config["method"], loaded.source.fingerprint()[0] if strict else None, dim)
        return cls(index, method, config, image_roots=image_roots, max_pixels=max_pixels)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_roots(self) -> tuple[Path, ...]:
        """The only folders image files are read from: those given (``image_roots``, or assigned
        later), else the index's own, which follow the index through :meth:`reopen`."""
        return self._image_roots if self._image_roots is not None else self.index.image_roots

    @image_roots.setter
    def image_roots(self, roots: Sequence[str | os.PathLike] | None) -> None:
        self._image_roots = real_roots(roots) if roots is not None else None

    def reopen(self) -> "Searcher":
        """A searcher over the index as it is on disk now (after ``tbps index add`` or a rebuild),
        sharing this one's model, text processor, image roots and limits; this one is unchanged.

        The index on disk must have been made by the same model as the one open here (method,
        feature size and checkpoint hash, as recorded in both manifests), else
        :class:`IndexCompatibilityError`: its embeddings would not be comparable with the queries.
        """
        index = GalleryIndex.open(self.index.path)
        served = self.index.manifest
        try:
            check_compatible(index.manifest, self.method, served["method"], served["checkpoint_sha256"], served["feature_dim"])
        except IndexCompatibilityError as error:
            raise IndexCompatibilityError(
                f"the index on disk was rebuilt with another model than the one being served ({error}); "
                "restart with its checkpoint to serve it"
            ) from None
        fresh = copy.copy(self)
        fresh.index = index
        return fresh

    @property
    def scoring(self) -> str:
        """``"global"`` when the method's test score is the global cosine (FAISS ranks), else
        ``"method"`` (every allowed image is scored with the method's ``similarity``)."""
        own = type(self.method).similarity is not PersonSearchMethod.similarity
        return "method" if own and bool(self.method.has_fine_similarity) else "global"

    # ------------------------------------------------------------------ image files
    def open_image_file(self, image_id: int):
        """The indexed file of ``image_id``, opened, if it is still a regular file inside the
        image roots (:func:`~tbps.search.images.open_inside_roots`); the caller closes it."""
        image_id = self._check_id(image_id)
        return open_inside_roots(self.index.metadata[image_id]["path"], self.image_roots)

    def load_image(self, image_id: int, *, semaphore: threading.Semaphore | None = None, exif_transpose: bool = False) -> Image.Image:
        """The decoded RGB picture of ``image_id`` (confined to the image roots, at most
        ``max_pixels`` pixels)."""
        image_id = self._check_id(image_id)
        with self.open_image_file(image_id) as handle:
            return decode_image(handle, max_pixels=self.max_pixels, name=self.index.metadata[image_id]["path"],
                                semaphore=semaphore, exif_transpose=exif_transpose)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.method.encode_text(self.text_processor(list(texts)))

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return self.method.encode_image(self.transform(image.convert("RGB")).unsqueeze(0))

    # ------------------------------------------------------------------ stage 1
    def _allowed_ids(self, filters: SearchFilters) -> np.ndarray | None:
        if not filters.active:
            return None
        return np.array([i for i, row in enumerate(self.index.metadata) if filters.allows(row)], dtype=np.int64)

    def _stage_one(self, query: np.ndarray, count: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``count`` (ids, cosine scores) for one normalised query vector [D]."""
        query = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        if allowed is not None and len(allowed) <= EXACT_FILTER_LIMIT:
            if len(allowed) == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
            scores = np.asarray(self.index.vectors[allowed], dtype=np.float32) @ query[0]
            # Stable descending order: ties keep gallery order, as everywhere else in tbps.
            order = np.argsort(-scores, kind="stable")[:count]
            return allowed[order], scores[order]
        params = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
            params = faiss.SearchParameters(sel=selector)
            ivf = _ivf_of(self.index.faiss_index)
            if ivf is not None:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
            elif hasattr(self.index.faiss_index, "hnsw"):
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.index.faiss_index.hnsw.efSearch)
        scores, ids = self.index.faiss_index.search(query, min(count, len(self.index)), params=params)
        keep = ids[0] >= 0  # FAISS pads with -1 when fewer results exist
        return ids[0][keep].astype(np.int64), scores[0][keep]

    # ------------------------------------------------------------------ search
    def search(
        self,
        text: str,
        k: int = 10,
        *,
        filters: SearchFilters | Mapping[str, Any] | None = None,
        rerank: str = "none",
        candidates: int = DEFAULT_CANDIDATES,
        rvn_neighbours: int = 10,
    ) -> list[Hit]:
        """The ``k`` best images for a description, best first."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the query text is empty")
        _check_k(k)
        if rerank not in RERANK_MODES:
            raise ValueError(f"rerank must be one of {RERANK_MODES}, got {rerank!r}")
        text_features = self.encode_text([text.strip()])
        allowed = self._allowed_ids(SearchFilters.from_value(filters))
        pool = k if rerank == "none" else max(k, candidates)
        if rerank.startswith("two-stage") or self.scoring == "global":
            # Stage 1 of two-stage is the global cosine by definition (as in the evaluator).
            query = F.normalize(text_features["global"].float(), dim=-1)[0].numpy()
            ids, scores = self._stage_one(query, pool, allowed)
        else:
            ids, scores = self._method_top(text_features, pool, allowed)
        if rerank != "none" and len(ids):
            ids, scores = self._rerank(text_features, ids, scores, rerank, rvn_neighbours)
        return self._hits(ids[:k], scores[:k])

    def _score_tile(self) -> int:
        """Images per tile of exhaustive scoring: ``score_tile_bytes`` of float32 features."""
        per_image = 4 * int(np.prod(self.index.vectors.shape[1:]))
        per_image += sum(4 * int(np.prod(values.shape[1:])) for values in self.index.local.values())
        return max(1, self.score_tile_bytes // max(1, per_image))

    @torch.no_grad()
    def _method_top(self, text_features: Mapping[str, torch.Tensor], count: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``count`` (ids, scores) of one query by the method's own :meth:`similarity`,
        scoring every allowed image tile by tile. Ties keep gallery order (stable, as ``rank``)."""
        ids = np.arange(len(self.index), dtype=np.int64) if allowed is None else allowed
        best_ids, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        tile = self._score_tile()
        for start in range(0, len(ids), tile):
            chunk = ids[start : start + tile]
            scores = self.method.similarity(text_features, self.index.image_features(chunk))[0].float().cpu().numpy()
            merged_ids = np.concatenate([best_ids, chunk])
            merged_scores = np.concatenate([best_scores, scores.astype(np.float32)])
            order = np.lexsort((merged_ids, -merged_scores))[:count]  # by score, then by id
            best_ids, best_scores = merged_ids[order], merged_scores[order]
        return best_ids, best_scores

    def rescore_candidates(self, text_features: Mapping[str, torch.Tensor], ids: np.ndarray, coarse: np.ndarray, rerank: str, rvn_neighbours: int = 10) -> np.ndarray:
        """Scores [n] of the candidates ``ids`` (stage-1 order) after two-stage and / or RVN."""
        image_features = self.index.image_features(ids)
        similarity = torch.from_numpy(np.asarray(coarse, dtype=np.float32)).reshape(1, -1)
        if rerank.startswith("two-stage"):

            def fine_scorer(query_indices: torch.Tensor, candidate_positions: torch.Tensor) -> torch.Tensor:
                return self.method.score_candidates(text_features, image_features, candidate_positions)

            with torch.no_grad():
                similarity = two_stage_similarity(similarity, fine_scorer, top_k=len(ids))
        if rerank.endswith("rvn"):
            # Image-image neighbours among the candidates only: exact RVN over a million images
            # would need the full image-image graph; the candidates hold every image that can rank.
            vectors = image_features["global"]
            similarity = rvn_rerank(similarity, vectors @ vectors.t(), neighbours=min(rvn_neighbours, len(ids)))
        return similarity[0].float().numpy()

    def _rerank(self, text_features: Mapping[str, torch.Tensor], ids: np.ndarray, coarse: np.ndarray, rerank: str, rvn_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.rescore_candidates(text_features, ids, coarse, rerank, rvn_neighbours)
        order = np.argsort(-scores, kind="stable")
        return ids[order], scores[order]

    def search_by_image(self, image: str | os.PathLike | Image.Image, k: int = 10, *, filters: SearchFilters | Mapping[str, Any] | None = None) -> list[Hit]:
        """"More like this person": nearest images to a picture by the same image encoder."""
        _check_k(k)
        picture = image if isinstance(image, Image.Image) else decode_image(image, max_pixels=self.max_pixels)
        vector = F.normalize(self.encode_image(picture)["global"].float(), dim=-1)[0].numpy()
        return self.search_by_vector(vector, k, filters=filters)

    def search_by_id(self, image_id: int, k: int = 10, *, filters: SearchFilters | Mapping[str, Any] | None = None) -> list[Hit]:
        """Nearest images to an indexed image, from its stored embedding (no re-encoding)."""
        _check_k(k)
        image_id = self._check_id(image_id)
        return self.search_by_vector(np.asarray(self.index.vectors[image_id], dtype=np.float32), k, filters=filters)

    def search_by_vector(self, vector: np.ndarray, k: int, *, filters: SearchFilters | Mapping[str, Any] | None = None) -> list[Hit]:
        ids, scores = self._stage_one(vector, k, self._allowed_ids(SearchFilters.from_value(filters)))
        return self._hits(ids, scores)

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        hits = []
        for rank, (image_id, score) in enumerate(zip(ids.tolist(), scores.tolist()), start=1):
            row = self.index.metadata[image_id]
            meta = {key: value for key, value in row.items() if key != "path"}
            hits.append(Hit(int(image_id), rank, float(score), row["path"], meta))
        return hits

    def _check_id(self, image_id: int) -> int:
        """``image_id`` as an int, if it is an integer id in the index: a string, float or bool is a
        TypeError (not a numpy IndexError from the lookup), an id out of range a KeyError."""
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise TypeError(f"image id must be an integer, got {image_id!r} ({type(image_id).__name__})")
        image_id = int(image_id)
        if not 0 <= image_id < len(self.index):
            raise KeyError(f"no image with id {image_id} (the index holds ids 0..{len(self.index) - 1})")
        return image_id

    # ------------------------------------------------------------------ explanations
    def phrases(self, text: str, max_phrases: int = 5) -> list[str]:
        """The query's noun phrases (the whole query when none are found)."""
        from tbps.text.phrases import NounPhraseExtractor

        with self._phrase_lock:  # the parser is loaded once and is not thread-safe
            if self._phrases is None:
                self._phrases = NounPhraseExtractor()
            found = self._phrases.extract(text, max_phrases=max_phrases)
        return found or [text.strip()]

    @torch.no_grad()
    def explain(self, hit: Hit | int, text: str, *, grid: tuple[int, int] = (8, 4), max_phrases: int = 5) -> Explanation:
        """Which image regions match which phrases of ``text``, as a heatmap PNG.

        Uses the method's own attention when it has one (:meth:`PersonSearchMethod.explain`),
        otherwise :func:`occlusion_relevance`, valid for every method.
        """
        if not text.strip():
            raise ValueError("the query text is empty")
        image_id = self._check_id(hit.id if isinstance(hit, Hit) else hit)
        picture = self.load_image(image_id)
        own = self.method.explain(self.transform(picture), text.strip())
        if own is not None:
            return self._method_explanation(picture, text.strip(), *own)
        phrases = self.phrases(text, max_phrases)
        labels = [text.strip()] + [p for p in phrases if p != text.strip()]
        drops, scores = occlusion_relevance(self.method, self.transform(picture), labels, self.text_processor, grid)
        positive = np.clip(drops, 0.0, None)
        scale = positive.reshape(len(labels), -1).max(axis=1).reshape(-1, 1, 1)
        maps = np.divide(positive, scale, out=np.zeros_like(positive), where=scale > 0)
        png = render_heatmaps(picture, labels, maps, scores.tolist())
        return Explanation(labels, maps, drops, png)

    def _method_explanation(self, picture: Image.Image, text: str, phrases: list[str], maps: torch.Tensor) -> Explanation:
        """An explanation from the method's own attention (NAFS, ACSA, LAIP, ... where defined)."""
        values = maps.detach().float().clamp(min=0).cpu().numpy()
        scale = values.reshape(len(values), -1).max(axis=1).reshape(-1, 1, 1)
        normalised = np.divide(values, scale, out=np.zeros_like(values), where=scale > 0)
        text_vectors = F.normalize(self.encode_text(phrases)["global"].float(), dim=-1)
        image_vector = F.normalize(self.encode_image(picture)["global"].float(), dim=-1)
        scores = (text_vectors @ image_vector.t())[:, 0].tolist()
        png = render_heatmaps(picture, phrases, normalised, scores)
        return Explanation(phrases, normalised, values, png)


def _ivf_of(index: faiss.Index) -> Any | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in 1..{MAX_K}, got {k!r}")


@torch.no_grad()
def occlusion_relevance(
    method: PersonSearchMethod, image: torch.Tensor, labels: Sequence[str], text_processor: Any, grid: tuple[int, int] = (8, 4)
) -> tuple[np.ndarray, np.ndarray]:
    """A generic explanation, valid for every method: hide one patch of ``image`` [3 x H x W] at
    a time (set to the normalised mean, i.e. 0) and measure how much the cosine between each
    label and the image drops. Patches are two grid cells wide with a one-cell stride, so
    neighbouring cells share evidence and the map is smooth.

    Returns the drops [labels x rows x cols] and each label's cosine to the whole image [labels].
    """
    rows, cols = grid
    height, width = image.shape[-2:]
    cell_h, cell_w = height / rows, width / cols
    windows = [(r, c) for r in range(rows) for c in range(cols)]
    occluded = image.unsqueeze(0).repeat(len(windows) + 1, 1, 1, 1)
    for n, (r, c) in enumerate(windows, start=1):
        top, left = int(round((r - 0.5) * cell_h)), int(round((c - 0.5) * cell_w))
        bottom, right = int(round((r + 1.5) * cell_h)), int(round((c + 1.5) * cell_w))
        occluded[n, :, max(0, top) : bottom, max(0, left) : right] = 0.0
    image_vectors = F.normalize(method.encode_image(occluded)["global"].float(), dim=-1)
    text_batch = {key: value.to(image.device) for key, value in text_processor(list(labels)).items()}
    text_vectors = F.normalize(method.encode_text(text_batch)["global"].float(), dim=-1)
    similarity = text_vectors @ image_vectors.t()  # [labels x (1 + windows)]
    drops = (similarity[:, :1] - similarity[:, 1:]).reshape(len(labels), rows, cols)
    return drops.cpu().numpy(), similarity[:, 0].cpu().numpy()


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to RGB from dark blue through yellow to red (a perceptually ordered ramp)."""
    stops = np.array([[20, 30, 120], [40, 120, 200], [120, 200, 120], [250, 220, 60], [220, 40, 30]], dtype=np.float32)
    position = np.clip(values, 0.0, 1.0) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    fraction = (position - low)[..., None]
    return (stops[low] * (1 - fraction) + stops[low + 1] * fraction).astype(np.uint8)


def _heat_panel(base: Image.Image, relevance: np.ndarray) -> Image.Image:
    """``base`` with a relevance map in [0, 1] (any grid) blended on top in :func:`_colormap` colours."""
    heat = Image.fromarray((np.clip(relevance, 0.0, 1.0) * 255).astype(np.uint8), "L").resize(base.size, Image.Resampling.BICUBIC)
    level = np.asarray(heat, dtype=np.float32) / 255.0
    coloured = Image.fromarray(_colormap(level), "RGB")
    # Opacity follows relevance, so regions that do not matter keep the photo visible.
    alpha = Image.fromarray((255 * (0.1 + 0.6 * level)).astype(np.uint8), "L")
    return Image.composite(coloured, base, alpha)


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> list[str]:
    """``text`` cut into lines no wider than ``width`` pixels (at word boundaries)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    return lines


def _png(sheet: Image.Image) -> bytes:
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def render_heatmaps(picture: Image.Image, labels: Sequence[str], maps: np.ndarray, scores: Sequence[float], height: int = 256) -> bytes:
    """One panel per phrase: the image with its relevance map blended on top, phrase underneath."""
    width = max(1, round(picture.width * height / picture.height))
    base = picture.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    caption_height, pad = 46, 6
    panel_width = max(width, 120)
    sheet = Image.new("RGB", (pad + len(labels) * (panel_width + pad), height + caption_height + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for n, (label, relevance, score) in enumerate(zip(labels, maps, scores)):
        x = pad + n * (panel_width + pad)
        sheet.paste(_heat_panel(base, relevance), (x + (panel_width - width) // 2, pad))
        lines = _wrap(draw, label, panel_width, font)
        title = ("query: " if n == 0 else "") + f"cos {score:.2f}"
        draw.text((x, height + pad + 2), title, fill=(90, 90, 90), font=font)
        for i, text_line in enumerate(lines[:2]):
            draw.text((x, height + pad + 15 + 12 * i), text_line, fill=(0, 0, 0), font=font)
    return _png(sheet)


def _figure_font(size: int = 12) -> tuple[Any, bool]:
    """DejaVu Sans where the system has it (it draws "→"), else Pillow's default font; and
    whether the font draws arrows."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        return ImageFont.load_default(), False


def render_attention_figure(
    picture: Image.Image,
    rows: Mapping[str, tuple[Sequence[str], Any]],
    title: str,
    height: int = 192,
    max_columns: int = 10,
) -> bytes:
    """A PNG with one figure row per entry of ``rows`` (:meth:`PersonSearchMethod.visualize`:
    title -> (labels, maps [n x h x w], non-negative)): the row title, then one panel per label,
    the picture with that map blended on top and the label underneath.

    Maps are divided by their row's maximum, so the panels of a row compare with each other; the
    row title gives the row's range. Rows of more than ``max_columns`` panels wrap onto more lines.
    """
    font, arrows = _figure_font()
    ascii_arrows = (lambda text: text) if arrows else (lambda text: text.replace("→", "->"))
    prepared = []
    for row_title, (labels, maps) in rows.items():
        values = np.nan_to_num(torch.as_tensor(maps).detach().float().cpu().numpy(), nan=0.0, posinf=0.0)
        if values.ndim != 3 or len(values) != len(labels):
            raise ValueError(f"row {row_title!r}: expected maps [labels x h x w] for {len(labels)} labels, got shape {values.shape}")
        if len(labels):
            values = np.clip(values, 0.0, None)
            scale = float(values.max())
            normalised = values / scale if scale > 0 else np.zeros_like(values)
            span = f"values {float(values.min()):.3g} to {scale:.3g}"  # equal ends: the maps are flat
            prepared.append((f"{row_title}  ({span})", [str(label) for label in labels], normalised))
    if not prepared:
        raise ValueError("nothing to draw: every row of the figure is empty")

    width = max(1, round(picture.width * height / picture.height))
    base = picture.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    pad, line, label_lines = 8, 15, 3
    panel_width = max(width, 130)
    columns = min(max_columns, max(len(labels) for _, labels, _ in prepared))
    sheet_width = pad + columns * (panel_width + pad)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = _wrap(measure, ascii_arrows(title), sheet_width - 2 * pad, font)
    header.append("colour: blue = low, red = high; each row scaled to its own maximum")
    panel_height = height + label_lines * line + pad
    total = pad + len(header) * line + pad
    for _, labels, _ in prepared:
        total += line + pad // 2 + math.ceil(len(labels) / columns) * panel_height + pad
    sheet = Image.new("RGB", (sheet_width, total), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for i, text_line in enumerate(header):
        draw.text((pad, y), text_line, fill=(0, 0, 0) if i < len(header) - 1 else (110, 110, 110), font=font)
        y += line
    y += pad
    for row_title, labels, normalised in prepared:
        draw.text((pad, y), ascii_arrows(row_title), fill=(20, 60, 140), font=font)
        y += line + pad // 2
        for n, (label, relevance) in enumerate(zip(labels, normalised)):
            if n and n % columns == 0:
                y += panel_height
            x = pad + (n % columns) * (panel_width + pad)
            sheet.paste(_heat_panel(base, relevance), (x + (panel_width - width) // 2, y))
            lines = _wrap(draw, ascii_arrows(label), panel_width, font)
            if len(lines) > label_lines:
                lines = lines[: label_lines - 1] + [lines[label_lines - 1] + " ..."]
            for k, text_line in enumerate(lines):
                draw.text((x, y + height + 2 + line * k), text_line, fill=(0, 0, 0), font=font)
        y += panel_height + pad
    return _png(sheet)
