"""PyTorch datasets for training pairs and the evaluation protocol.

Training uses one row per caption (every caption of every image is a pair). Evaluation follows
the protocol of every paper since 2017: the queries are all captions of the split, the gallery
is every image of the split once, and relevance is at identity level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from tbps.data.records import ImageRecord, load_image
from tbps.data.transforms import ImageTransform, sample_generator


def _split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """Our samplers yield (index, epoch); plain integer indices mean epoch 0."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


class CaptionPairs(Dataset):
    """One (image, caption) training pair per caption, with a contiguous class label per person."""

    def __init__(self, records: Sequence[ImageRecord], labels: dict[int, int], transform: ImageTransform, seed: int = 0):
        self.records = list(records)
        self.labels = labels
        self.transform = transform
        self.seed = seed
        self.pairs = [(r, c) for r, record in enumerate(self.records) for c in range(len(record.captions))]

    @property
    def person_ids(self) -> list[int]:
        return [self.records[r].person_id for r, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = _split_key(key)
        record_index, caption_index = self.pairs[index]
        record = self.records[record_index]
        # Augmentation randomness derives from (seed, epoch, index), so a resumed run and
        # worker processes draw exactly what an uninterrupted run draws.
        image = self.transform(load_image(record.image_path), sample_generator(self.seed, epoch, index))
        return {
            "image": image,
            "caption": record.captions[caption_index],
            "label": self.labels[record.person_id],
            "person_id": record.person_id,
            "image_id": record_index,  # which image a caption belongs to (several captions share one)
            "index": index,
        }


class GalleryImages(Dataset):
    """Every image of a split once, in record order."""

    def __init__(self, records: Sequence[ImageRecord], transform: ImageTransform):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        return {"image": self.transform(load_image(record.image_path)), "person_id": record.person_id, "index": index}


@dataclass
class Query:
    caption: str
    person_id: int
    record_index: int  # the image this caption was written for


def build_queries(records: Sequence[ImageRecord]) -> list[Query]:
    """All captions of a split, in record order (the query set of the protocol)."""
    return [Query(caption, record.person_id, i) for i, record in enumerate(records) for caption in record.captions]


class QueryCaptions(Dataset):
    def __init__(self, queries: Sequence[Query]):
        self.queries = list(queries)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        query = self.queries[index]
        return {"caption": query.caption, "person_id": query.person_id, "index": index}


class Collate:
    """Stack images, tokenise captions with the method's text processor (picklable for workers)."""

    def __init__(self, text_processor: Callable[[Sequence[str]], dict[str, Tensor]] | None = None):
        self.text_processor = text_processor

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "person_ids": torch.tensor([item["person_id"] for item in items]),
            "indices": torch.tensor([item["index"] for item in items]),
        }
        if "image" in items[0]:
            batch["images"] = torch.stack([item["image"] for item in items])
        if "image_id" in items[0]:
            batch["image_ids"] = torch.tensor([item["image_id"] for item in items])
        if "label" in items[0]:
            batch["labels"] = torch.tensor([item["label"] for item in items])
        if "caption" in items[0]:
            batch["captions"] = [item["caption"] for item in items]
            if self.text_processor is not None:
                batch["text"] = self.text_processor(batch["captions"])
        return batch
