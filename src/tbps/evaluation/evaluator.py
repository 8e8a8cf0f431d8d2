"""Method-agnostic evaluation: encode the gallery and the queries through the method interface,
score them (optionally two-stage and re-ranked), and rank.

The trainer's validation, ``tbps eval`` and the search index all use these functions, so every
registered method is evaluated the same way.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from tbps.data.datasets import Collate, GalleryImages, QueryCaptions, build_queries
from tbps.data.records import ImageRecord
from tbps.data.transforms import ImageTransform
from tbps.evaluation.rank import rank
from tbps.evaluation.rerank import rvn_rerank, two_stage_similarity
from tbps.models.base import Features, PersonSearchMethod, concat_features, index_features

RERANK_MODES = ("none", "two-stage", "rvn", "two-stage+rvn")


def _to(features: Mapping[str, Tensor], device: torch.device | str) -> Features:
    return {key: value.to(device) for key, value in features.items()}


def _progress(iterable, description: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, leave=False)


@torch.no_grad()
def encode_image_batches(method: PersonSearchMethod, loader: DataLoader, device: torch.device | str = "cpu", progress: bool = False) -> Features:
    """Encode every batch of ``loader`` (items with ``images``) into features on the CPU."""
    chunks = []
    for batch in _progress(loader, "images", progress):
        chunks.append(_to(method.encode_image(batch["images"].to(device)), "cpu"))
    return concat_features(chunks)


@torch.no_grad()
def encode_text_batches(method: PersonSearchMethod, loader: DataLoader, device: torch.device | str = "cpu", progress: bool = False) -> Features:
    chunks = []
    for batch in _progress(loader, "captions", progress):
        chunks.append(_to(method.encode_text(_to(batch["text"], device)), "cpu"))
    return concat_features(chunks)


@torch.no_grad()
def score_features(
    method: PersonSearchMethod,
    text_features: Mapping[str, Tensor],
    image_features: Mapping[str, Tensor],
    *,
    rerank: str = "none",
    top_k: int = 128,
    rvn_neighbours: int = 10,
    chunk_size: int = 256,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The [texts x images] similarity used for ranking.

    ``none``: the method's own similarity; ``two-stage``: global cosine over the whole gallery,
    then :meth:`score_candidates` on the top-k; ``rvn``: reciprocal view-neighbour re-ranking
    (NAFS, corrected form, each query's scores min-max normalised first: (7), (8) in
    :func:`rvn_rerank`) on top of either; after two-stage only the top-k candidates are re-scored,
    so every non-candidate stays below them.

    Re-ranked rows are per-query scores (shifted, normalised): compare them within a row only. The
    image-to-text direction ranks a column across rows, so it must use ``rerank="none"``.
    """
    if rerank not in RERANK_MODES:
        raise ValueError(f"rerank must be one of {RERANK_MODES}, got {rerank!r}")
    images = _to(image_features, device)
    num_texts = next(iter(text_features.values())).shape[0]
    if rerank.startswith("two-stage"):
        texts = _to(text_features, device)
        coarse = method.global_similarity(texts, images)

        def fine_scorer(query_indices: Tensor, candidates: Tensor) -> Tensor:
            return method.score_candidates(index_features(texts, query_indices), images, candidates)

        similarity = two_stage_similarity(coarse, fine_scorer, top_k=top_k, chunk_size=chunk_size)
    else:
        rows = []
        for start in range(0, num_texts, chunk_size):
            chunk = _to(index_features(text_features, slice(start, start + chunk_size)), device)
            rows.append(method.similarity(chunk, images).float())
        similarity = torch.cat(rows)
    if rerank.endswith("rvn"):
        image_image = method.global_similarity(images, images)
        # After two-stage, RVN re-scores (and normalises over) the candidates only; min-max over a
        # whole row would shrink the gap that keeps non-candidates below them.
        rerank_top = top_k if rerank.startswith("two-stage") else None
        similarity = rvn_rerank(similarity, image_image, neighbours=rvn_neighbours, rerank_top=rerank_top)
    return similarity.cpu()


def scoring_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``eval`` section's scoring settings (rerank, top_k, rvn_neighbours) as keyword arguments."""
    section = config.get("eval") or {}
    return {
        "rerank": str(section.get("rerank", "none")),
        "top_k": int(section.get("top_k", 128)),
        "rvn_neighbours": int(section.get("rvn_neighbours", 10)),
    }


def eval_loaders(
    records: Sequence[ImageRecord],
    method: PersonSearchMethod,
    image_size: Sequence[int],
    batch_size: int = 128,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Gallery (each image once) and query (every caption) loaders for a split."""
    mean, std = method.image_mean_std
    gallery = GalleryImages(records, ImageTransform(tuple(image_size), mean, std, train=False))
    queries = QueryCaptions(build_queries(records))
    collate = Collate(method.build_text_processor())
    return (
        DataLoader(gallery, batch_size=batch_size, num_workers=num_workers, collate_fn=collate),
        DataLoader(queries, batch_size=batch_size, num_workers=num_workers, collate_fn=collate),
    )


def evaluate_split(
    method: PersonSearchMethod,
    records: Sequence[ImageRecord],
    image_size: Sequence[int],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    rerank: str = "none",
    top_k: int = 128,
    rvn_neighbours: int = 10,
    device: torch.device | str = "cpu",
    progress: bool = False,
    return_similarity: bool = False,
    image_to_text: bool = False,
) -> dict[str, Any]:
    """Encode, score and rank one split; returns metrics, per-query results and the id lists.

    ``image_to_text``: also rank every image's captions, as ``result["i2t"]`` (R@k, mAP, mINP).
    That direction always ranks the method's plain similarity (``rerank="none"``), whatever
    ``rerank`` is: two-stage and RVN scores are shifted and normalised per text query, so a column
    of them mixes scales and cannot rank texts against each other.
    """
    method.eval()
    gallery_loader, query_loader = eval_loaders(records, method, image_size, batch_size, num_workers)
    image_features = encode_image_batches(method, gallery_loader, device, progress)
    text_features = encode_text_batches(method, query_loader, device, progress)
    similarity = score_features(
        method, text_features, image_features, rerank=rerank, top_k=top_k, rvn_neighbours=rvn_neighbours, device=device
    )
    query_ids = torch.tensor([q.person_id for q in query_loader.dataset.queries])
    gallery_ids = torch.tensor([r.person_id for r in records])
    result = rank(similarity, query_ids, gallery_ids, max_rank=10, return_per_query=True)
    result["query_ids"] = query_ids
    result["gallery_ids"] = gallery_ids
    if return_similarity:
        result["similarity"] = similarity
    if image_to_text:
        plain = similarity if rerank == "none" else score_features(method, text_features, image_features, device=device)
        i2t = rank(plain.t(), gallery_ids, query_ids, max_rank=10)
        result["i2t"] = {key: i2t[key] for key in ("R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_excluded")}
    return result
