"""Lightning data module: dataset loading, label mapping, samplers and loaders."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from tbps.data.datasets import CaptionPairs, Collate, GalleryImages, QueryCaptions, build_queries
from tbps.data.readers import load_dataset
from tbps.data.records import PersonSearchDataset
from tbps.data.samplers import EpochShuffleSampler, IdentityBalancedSampler
from tbps.data.transforms import ImageTransform
from tbps.models.base import TextProcessor

log = logging.getLogger(__name__)


def load_configured_dataset(data_config: Any, seed: int = 0) -> PersonSearchDataset:
    """The dataset a run's ``data`` config names (a mapping or a DictConfig), split as in training."""
    dataset = load_dataset(
        data_config["dataset"],
        data_config["root"],
        val_identity_fraction=float(data_config.get("val_identity_fraction", 0.1)),
        seed=seed,
    )
    for note in dataset.notes:
        log.info("%s: %s", dataset.name, note)
    return dataset


def eval_transform(data_config: Any, mean_std: tuple) -> ImageTransform:
    mean, std = mean_std
    return ImageTransform(tuple(data_config.image_size), mean, std, train=False)


class PersonSearchDataModule(L.LightningDataModule):
    """Training pairs with our (index, epoch) samplers; validation gallery + queries on val."""

    def __init__(
        self,
        data_config: Any,
        dataset: PersonSearchDataset,
        text_processor: TextProcessor,
        mean_std: tuple,
        seed: int = 0,
        val_split: str = "val",
    ) -> None:
        super().__init__()
        self.config = data_config
        self.dataset = dataset
        self.collate = Collate(text_processor)
        self.mean, self.std = mean_std
        self.seed = seed
        self.val_split = val_split
        self.train_records = dataset.split("train")
        self.labels = {pid: i for i, pid in enumerate(sorted({r.person_id for r in self.train_records}))}

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def _loader(self, dataset, **kwargs: Any) -> DataLoader:
        workers = int(self.config.num_workers)
        return DataLoader(
            dataset,
            collate_fn=self.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=False,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        augment = self.config.augment
        transform = ImageTransform(
            tuple(self.config.image_size),
            self.mean,
            self.std,
            train=True,
            flip_prob=float(augment.flip_prob),
            padding=int(augment.padding),
            random_crop=bool(augment.random_crop),
            random_erasing=float(augment.random_erasing),
        )
        pairs = CaptionPairs(self.train_records, self.labels, transform, seed=self.seed)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        batch_size = int(self.config.batch_size)
        if self.config.sampler == "identity":
            sampler = IdentityBalancedSampler(
                pairs.person_ids, batch_size, int(self.config.num_instances), seed=self.seed, rank=rank, world_size=world
            )
        elif self.config.sampler == "random":
            sampler = EpochShuffleSampler(len(pairs), seed=self.seed, rank=rank, world_size=world, drop_last=True)
        else:
            raise ValueError(f"data.sampler must be 'random' or 'identity', got {self.config.sampler!r}")
        # Batch-level losses need >= 2 pairs, hence drop_last.
        return self._loader(pairs, batch_size=batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        records = self.dataset.split(self.val_split)
        batch_size = int(self.config.eval_batch_size)
        gallery = GalleryImages(records, eval_transform(self.config, (self.mean, self.std)))
        queries = QueryCaptions(build_queries(records))
        return [self._loader(gallery, batch_size=batch_size), self._loader(queries, batch_size=batch_size)]
