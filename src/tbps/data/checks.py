"""Dataset statistics and health checks (missing or corrupt images, duplicates, identity leaks).

A dataset is **unusable** (``CheckReport.usable`` is False, ``errors`` says why) when any of:

- it has no records at all;
- a split has zero readable images (zero records when images are not checked);
- more than 5% of its distinct images are missing or unreadable;
- an identity appears in both train and test (an identity leak that inflates test scores).

Everything else (empty captions dropped, duplicate records, identities shared by train and
val, eval identities with a single image, ...) is a warning: counted, with examples, but usable.

Training is stricter: :func:`require_images` (run by ``tbps train`` before anything else) refuses
a run while any image of a split it reads is missing, empty or (``decode=True``) unreadable,
since one bad image crashes the epoch or the validation that reads it.
"""

from __future__ import annotations

import os
import stat
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from tbps.data.records import SPLIT_ORDER, PersonSearchDataset

MAX_BAD_IMAGE_FRACTION = 0.05
EVAL_SPLITS: tuple[str, ...] = ("val", "test")


def dataset_stats(ds: PersonSearchDataset) -> dict[str, dict[str, int]]:
    """Per split: number of images, distinct identities and captions, from the annotations only."""
    names = [name for name in SPLIT_ORDER if name in ds.splits] + [n for n in ds.splits if n not in SPLIT_ORDER]
    stats: dict[str, dict[str, int]] = {}
    for name in names:
        records = ds.splits[name]
        stats[name] = {
            "images": len(records),
            "identities": len({record.person_id for record in records}),
            "captions": sum(len(record.captions) for record in records),
        }
    return stats


@dataclass
class CheckReport:
    """Outcome of ``check_dataset``: issue counts, a few examples each, and the errors that make data unusable."""

    issues: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    images_checked: bool = False
    max_examples: int = 5

    @property
    def usable(self) -> bool:
        return not self.errors

    def add(self, kind: str, example: str | None = None, count: int = 1) -> None:
        self.issues[kind] = self.issues.get(kind, 0) + count
        if example is not None:
            kept = self.examples.setdefault(kind, [])
            if len(kept) < self.max_examples:
                kept.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {
            "usable": self.usable,
            "errors": list(self.errors),
            "issues": dict(self.issues),
            "examples": {kind: list(items) for kind, items in self.examples.items()},
            "stats": {split: dict(counts) for split, counts in self.stats.items()},
            "images_checked": self.images_checked,
        }


def image_problem(path: str | os.PathLike) -> tuple[str, str] | None:
    """None when the image is readable, else (issue kind, reason)."""
    path = Path(path)
    if not path.is_file():
        return "missing_image", "file not found"
    try:
        # verify() checks structure cheaply but misses truncated pixel data; a full load catches that.
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
        return "unreadable_image", f"{type(error).__name__}: {error}"
    return None


def check_dataset(
    ds: PersonSearchDataset, *, check_images: bool = True, max_examples: int = 5, workers: int = 2
) -> CheckReport:
    """Check ``ds`` for problems; see the module docstring for what counts as unusable."""
    report = CheckReport(stats=dataset_stats(ds), images_checked=check_images, max_examples=max_examples)

    # Everything the reader already fixed or dropped.
    for kind, count in ds.report.counts.items():
        report.issues[kind] = report.issues.get(kind, 0) + count
        report.examples.setdefault(kind, []).extend(ds.report.examples.get(kind, [])[:max_examples])
    for kind in list(report.examples):
        if not report.examples[kind]:
            del report.examples[kind]

    records = ds.records
    if not records:
        report.errors.append("no records at all")
        return report

    _check_duplicates(ds, report)
    _check_identities(ds, report)

    for name, split_records in ds.splits.items():
        if not split_records:
            report.errors.append(f"split {name!r} has no records")

    if check_images:
        _check_images(ds, report, workers=workers)
    return report


def _check_duplicates(ds: PersonSearchDataset, report: CheckReport) -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for record in ds.records:
        where[os.path.normpath(str(record.image_path))].append(record.split)
    for path, splits in where.items():
        if len(splits) > 1:
            report.add("duplicate_record", f"{path} listed {len(splits)} times (splits: {', '.join(splits)})",
                       count=len(splits) - 1)


def _check_identities(ds: PersonSearchDataset, report: CheckReport) -> None:
    splits_of: dict[int, set[str]] = defaultdict(set)
    for record in ds.records:
        splits_of[record.person_id].add(record.split)
    for person_id, splits in sorted(splits_of.items()):
        if len(splits) > 1:
            ordered = [name for name in SPLIT_ORDER if name in splits] + sorted(splits - set(SPLIT_ORDER))
            report.add("identity_in_multiple_splits", f"id {person_id} in {', '.join(ordered)}")
    leaked = sorted(pid for pid, splits in splits_of.items() if {"train", "test"} <= splits)
    if leaked:
        shown = ", ".join(str(pid) for pid in leaked[: report.max_examples])
        report.errors.append(f"identity leak: {len(leaked)} identities in both train and test (e.g. {shown})")

    for name in EVAL_SPLITS:
        counts = Counter(record.person_id for record in ds.splits.get(name, []))
        for person_id, count in sorted(counts.items()):
            if count == 1:
                report.add("single_image_identity_in_eval", f"id {person_id} has one image in {name}")


def _check_images(ds: PersonSearchDataset, report: CheckReport, *, workers: int) -> None:
    paths = sorted({os.path.normpath(str(record.image_path)) for record in ds.records})
    # Decoding is mostly I/O and C code that releases the GIL, so threads parallelise well.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = dict(zip(paths, pool.map(image_problem, paths)))
    bad = 0
    for path, problem in problems.items():
        if problem is not None:
            kind, reason = problem
            report.add(kind, f"{path}: {reason}")
            bad += 1
    if bad and bad > MAX_BAD_IMAGE_FRACTION * len(paths):
        report.errors.append(
            f"{bad} of {len(paths)} images ({bad / len(paths):.1%}) are missing or unreadable "
            f"(more than {MAX_BAD_IMAGE_FRACTION:.0%})"
        )
    for name, split_records in ds.splits.items():
        readable = sum(problems[os.path.normpath(str(record.image_path))] is None for record in split_records)
        if split_records and readable == 0:
            report.errors.append(f"split {name!r} has no readable image")


# --------------------------------------------------------------------------- before a training run

IMAGE_CHECKS: tuple[str, ...] = ("exists", "decode")


class MissingImagesError(FileNotFoundError):
    """Images a run would read are missing or unreadable; the message counts them per split and
    names the first few."""


def _exists_problem(path: str) -> tuple[str, str] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing_image", "file not found"
    except OSError as error:
        return "unreadable_image", f"{type(error).__name__}: {error}"
    if not stat.S_ISREG(info.st_mode):
        return "missing_image", "not a regular file"
    if info.st_size == 0:  # a download that never arrived
        return "unreadable_image", "empty file"
    return None


def find_bad_images(
    ds: PersonSearchDataset, splits: tuple[str, ...] | list[str], *, decode: bool = False, workers: int = 4
) -> tuple[int, list[tuple[str, str, str]]]:
    """Check every distinct image of ``splits``: exists, is a non-empty regular file, and with
    ``decode`` also decodes fully (:func:`image_problem`). Returns (images checked,
    [(split, path, reason)] of the bad ones in record order)."""
    where: dict[str, str] = {}
    for name in splits:
        for record in ds.splits.get(name, []):
            where.setdefault(os.path.normpath(str(record.image_path)), name)
    paths = list(where)
    check = image_problem if decode else _exists_problem
    # Both checks wait on the file system (and the decoder releases the GIL): threads overlap them.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(check, paths))
    bad = [(where[path], path, problem[1]) for path, problem in zip(paths, problems) if problem is not None]
    return len(paths), bad


def require_images(
    ds: PersonSearchDataset,
    splits: tuple[str, ...] | list[str],
    *,
    decode: bool = False,
    workers: int = 4,
    max_examples: int = 5,
) -> int:
    """Raise :class:`MissingImagesError` if any image of ``splits`` is bad (see
    :func:`find_bad_images`); returns the number of distinct images checked."""
    checked, bad = find_bad_images(ds, splits, decode=decode, workers=workers)
    if bad:
        per_split = Counter(split for split, _, _ in bad)
        counts = ", ".join(f"{name}: {per_split.get(name, 0)}" for name in splits)
        shown = "; ".join(f"{path} ({split}: {reason})" for split, path, reason in bad[:max_examples])
        more = f"; ... and {len(bad) - max_examples} more" if len(bad) > max_examples else ""
        what = "missing or unreadable" if decode else "missing or empty"
        raise MissingImagesError(
            f"{len(bad)} of {checked} images this run reads are {what} ({counts}): {shown}{more}. "
            f"Check data.root ({ds.root}), restore the files or drop their records; "
            "`tbps data check` reports every problem of the dataset"
        )
    return checked
