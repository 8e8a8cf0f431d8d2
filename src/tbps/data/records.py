"""Core data records shared by every dataset reader: images, captions, load reports, errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")



class DataFormatError(ValueError):
    """A malformed annotation file; the message names the file, the record or line, and the field."""


class ImageLoadError(OSError):
    """An image that cannot be read; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        # A single message argument: OSError's two-argument form would be read as (errno, strerror).
        super().__init__(f"cannot load image {os.fspath(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """One gallery image with every caption written for it."""

    image_path: Path  # absolute path of the image file (may not exist yet)
    person_id: int  # as written in the annotation file
    captions: tuple[str, ...]  # whitespace-normalised, every caption kept
    split: str  # "train" | "val" | "test"
    camera: str | None = None
    relative_path: str = ""  # the path exactly as written in the annotation


@dataclass
class LoadReport:
    """Counts of everything a reader fixed, dropped or skipped, with the first few examples of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, kind: str, example: str | None = None, count: int = 1) -> None:
        """Count ``count`` occurrences of ``kind``; keep ``example`` if fewer than ``max_examples`` are kept."""
        self.counts[kind] = self.counts.get(kind, 0) + count
        if example is not None:
            kept = self.examples.setdefault(kind, [])
            if len(kept) < self.max_examples:
                kept.append(example)

    def to_dict(self) -> dict[str, dict]:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}


@dataclass
class PersonSearchDataset:
    """A loaded dataset: records per split plus what happened while loading it."""

    name: str
    root: Path
    splits: dict[str, list[ImageRecord]]
    report: LoadReport = field(default_factory=LoadReport)
    notes: list[str] = field(default_factory=list)
    # Original string person ids of generic datasets, keyed by the integer id they were mapped to.
    person_names: dict[int, str] = field(default_factory=dict)

    def split(self, name: str) -> list[ImageRecord]:
        """Records of split ``name``; KeyError naming the available splits when absent."""
        try:
            return self.splits[name]
        except KeyError:
            available = ", ".join(self.splits) or "none"
            raise KeyError(f"dataset {self.name!r} has no split {name!r}; available splits: {available}") from None

    @property
    def records(self) -> list[ImageRecord]:
        """Every record of every split, in split order."""
        return [record for records in self.splits.values() for record in records]

    def __len__(self) -> int:
        return sum(len(records) for records in self.splits.values())


def normalize_caption(text: str) -> str:
    """The shared caption normalisation (:func:`tbps.text.tokenizers.normalize_caption`), with an
    empty result instead of an error, so readers can count and drop empty captions."""
    from tbps.text.tokenizers import EmptyCaptionError, normalize_caption as normalize

    try:
        return normalize(text)
    except EmptyCaptionError:
        return ""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image fully and return it as RGB; ImageLoadError for missing, corrupt or truncated files."""
    try:
        with Image.open(path) as image:
            # ``open`` only reads the header: ``load`` decodes the pixels, which is where
            # truncated and corrupt files fail.
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, f"image too large ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        # PIL signals unidentified/corrupt/truncated data with OSError subclasses, and some
        # plugins raise SyntaxError or ValueError on malformed headers.
        reason = str(error) or type(error).__name__
        raise ImageLoadError(path, reason) from error
