"""Readers for CUHK-PEDES, ICFG-PEDES, RSTPReid and a generic JSONL/CSV format.

Readers only parse annotation files: they never open an image, so a dataset can be loaded
(and its statistics printed) before the images are downloaded.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tbps.data.records import (
    SPLIT_ORDER,
    DataFormatError,
    ImageRecord,
    LoadReport,
    PersonSearchDataset,
    normalize_caption,
)

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("cuhk-pedes", "icfg-pedes", "rstpreid", "generic")

ANNOTATION_FILES: dict[str, tuple[str, ...]] = {
    "cuhk-pedes": ("reid_raw.json", "caption_all.json"),
    "icfg-pedes": ("ICFG-PEDES.json", "ICFG_PEDES.json"),
    "rstpreid": ("data_captions.json",),
    "generic": ("annotations.jsonl", "annotations.csv"),
}

IMAGE_DIR = "imgs"

_ALIASES: dict[str, str] = {
    "cuhkpedes": "cuhk-pedes",
    "cuhk": "cuhk-pedes",
    "icfgpedes": "icfg-pedes",
    "icfg": "icfg-pedes",
    "rstp": "rstpreid",
    "rstp-reid": "rstpreid",
}

_SPLIT_ALIASES: dict[str, str] = {"validation": "val", "valid": "val", "dev": "val"}

_MAX_NOTE_NAMES = 50
_INTEGER = re.compile(r"[+-]?\d+")
_GENERIC_REQUIRED = ("image", "person_id", "caption")


def canonical_name(name: str) -> str:
    """Canonical dataset name ("CUHK_PEDES" -> "cuhk-pedes"); ValueError listing the known names."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    return key


def find_annotation_file(name: str, root: str | os.PathLike) -> Path:
    """Locate the annotation file of dataset ``name`` under ``root`` (or ``root`` itself if it is the file)."""
    name = canonical_name(name)
    root = Path(root).expanduser()
    accepted = ANNOTATION_FILES[name]
    if root.is_file():
        if name == "generic" and root.suffix.lower() in (".jsonl", ".csv"):
            return root
        if root.name in accepted:
            return root
        raise FileNotFoundError(
            f"{root} is not an annotation file of {name}; accepted names: {', '.join(accepted)}"
            + (" (or any *.jsonl / *.csv file)" if name == "generic" else "")
        )
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    for candidate in accepted:
        if (root / candidate).is_file():
            return root / candidate
    raise FileNotFoundError(
        f"no annotation file for {name} in directory {root.resolve()}; looked for: {', '.join(accepted)}"
    )


def load_dataset(
    name: str, root: str | Path, *, val_identity_fraction: float = 0.1, seed: int = 0
) -> PersonSearchDataset:
    """Load dataset ``name`` from ``root`` without touching image files.

    ``val_identity_fraction`` and ``seed`` only matter for datasets that ship without a val
    split (ICFG-PEDES): that share of the train identities, drawn with ``seed``, is moved to a new
    val split; 0 carves none (train on the whole train split). ``seed`` is the carve-out's own seed
    (a run's ``data.val_split_seed``, see :func:`val_split_seed`), never the training seed: runs
    with different training seeds must select their models on the same val identities.
    """
    key = canonical_name(name)
    if not 0.0 <= val_identity_fraction < 1.0:
        raise ValueError(f"val_identity_fraction must be in [0, 1), got {val_identity_fraction}")
    annotation = find_annotation_file(key, root)
    return READERS[key](annotation, val_identity_fraction=val_identity_fraction, seed=seed)


def val_split_seed(config: Mapping[str, Any]) -> int:
    """The seed the config *of a run* (as stored beside it and in its checkpoints) carved its val
    split with: its ``data.val_split_seed``.

    ``tbps train`` writes that key into every run's config (default 0, independent of ``seed``).
    Configs of runs made before the option existed lack it: those carved with the training
    ``seed``, which is returned, so ``tbps eval --split val`` and a resumed run see the val
    identities the run was selected on.
    """
    value = (config.get("data") or {}).get("val_split_seed")
    if value is None:
        return int(config.get("seed", 0))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data.val_split_seed must be an integer, got {value!r}")
    return value


# --------------------------------------------------------------------------- shared helpers


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _read_json_list(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text ({error})") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got a JSON {_type_name(data)}")
    return data


def _parse_split(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field 'split' must be a string, got {_type_name(value)}")
    split = value.strip().lower()
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_ORDER:
        raise DataFormatError(f"{where}: field 'split' is {value!r}; expected one of {', '.join(SPLIT_ORDER)}")
    return split


def _parse_int_id(value: Any, where: str, field_name: str) -> int:
    # bool is an int subclass but never a valid id.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    raise DataFormatError(f"{where}: field {field_name!r} must be an integer, got {_type_name(value)} {value!r}")


def _clean_captions(raw: list[Any], where: str, report: LoadReport) -> list[str]:
    """Normalise each caption; drop (and count) empty ones."""
    cleaned: list[str] = []
    for position, caption in enumerate(raw):
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            raise DataFormatError(
                f"{where}: field 'captions'[{position}] must be a string, got {_type_name(caption)}"
            )
        text = _normalised_or_counted(caption, f"{where}, caption {position}", report)
        if text:
            cleaned.append(text)
    return cleaned


def _normalised_or_counted(caption: str, where: str, report: LoadReport) -> str:
    """The normalised caption, counting the change; empty (and counted as dropped) when blank."""
    text = normalize_caption(caption)
    if not text:
        report.add("empty_caption_dropped", where)
    elif text != caption:
        report.add("caption_normalised", f"{caption!r} -> {text!r}")
    return text


def _relative_to_path(rel: str, base: Path) -> Path:
    # Some annotation files were written on Windows; backslashes are never part of a file name here.
    rel_posix = rel.strip().replace("\\", "/")
    path = Path(rel_posix)
    return path if path.is_absolute() else base / path


def _ordered_splits(splits: dict[str, list[ImageRecord]]) -> dict[str, list[ImageRecord]]:
    return {name: splits[name] for name in SPLIT_ORDER if splits.get(name)}


# --------------------------------------------------------------------------- benchmark readers


def _read_benchmark(
    name: str, annotation: Path, *, path_field: str, split_names: tuple[str, ...]
) -> PersonSearchDataset:
    """Parse the JSON list shared by CUHK-PEDES, ICFG-PEDES and RSTPReid."""
    root = annotation.parent.resolve()
    images_dir = root / IMAGE_DIR
    report = LoadReport()
    splits: dict[str, list[ImageRecord]] = {}
    data = _read_json_list(annotation)
    loaded = 0
    for index, item in enumerate(data):
        where = f"{annotation}: record {index}"
        if not isinstance(item, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {_type_name(item)}")
        missing = [key for key in ("id", path_field, "captions", "split") if key not in item]
        if missing:
            report.add("record_skipped_missing_field", f"record {index}: missing {', '.join(missing)}")
            continue
        person_id = _parse_int_id(item["id"], where, "id")
        split = _parse_split(item["split"], where)
        if split not in split_names:
            raise DataFormatError(
                f"{where}: field 'split' is {item['split']!r}; {name} only has {', '.join(split_names)}"
            )
        rel = item[path_field]
        if not isinstance(rel, str) or not rel.strip():
            raise DataFormatError(f"{where}: field {path_field!r} must be a non-empty string, got {rel!r}")
        raw_captions = item["captions"]
        if isinstance(raw_captions, str):
            # A bare string is one caption; wrapping it keeps it instead of iterating characters.
            raw_captions = [raw_captions]
        if not isinstance(raw_captions, list):
            raise DataFormatError(f"{where}: field 'captions' must be a list, got {_type_name(raw_captions)}")
        captions = _clean_captions(raw_captions, where, report)
        if not captions:
            report.add("record_skipped_no_caption", f"record {index}: {rel}")
            continue
        record = ImageRecord(
            image_path=_relative_to_path(rel, images_dir),
            person_id=person_id,
            captions=tuple(captions),
            split=split,
            relative_path=rel,
        )
        splits.setdefault(split, []).append(record)
        loaded += 1
    if loaded == 0 and report.counts.get("record_skipped_missing_field"):
        # Every record lacked a field: almost certainly the wrong reader for this file.
        first = report.examples["record_skipped_missing_field"][0]
        raise DataFormatError(f"{annotation}: no usable record ({first}); is this really a {name} file?")
    notes = [f"annotations read from {annotation.name}; images expected under {images_dir}"]
    return PersonSearchDataset(name=name, root=root, splits=_ordered_splits(splits), report=report, notes=notes)


def carve_val_split(
    dataset: PersonSearchDataset, *, fraction: float, seed: int
) -> PersonSearchDataset:
    """Move ``fraction`` of the train identities (chosen with ``seed``) into a new val split, in place."""
    train = dataset.splits.get("train", [])
    identities = sorted({record.person_id for record in train})
    if fraction <= 0 or len(identities) < 2:
        message = (
            f"{dataset.name} has no val split and none was carved "
            f"(val_identity_fraction={fraction}, {len(identities)} train identities)"
        )
        dataset.notes.append(message)
        logger.info(message)
        return dataset
    # At least one identity goes to val, at least one stays in train.
    count = min(max(1, round(fraction * len(identities))), len(identities) - 1)
    rng = np.random.default_rng(seed)
    chosen = {identities[i] for i in rng.choice(len(identities), size=count, replace=False)}
    val = [_with_split(record, "val") for record in train if record.person_id in chosen]
    dataset.splits["train"] = [record for record in train if record.person_id not in chosen]
    dataset.splits["val"] = val
    dataset.splits = _ordered_splits(dataset.splits)
    message = (
        f"{dataset.name} ships without a val split: carved one out of train by identity "
        f"({count} of {len(identities)} train identities = {fraction:.0%}, seed {seed}, "
        f"{len(val)} images); val and train share no identity"
    )
    dataset.notes.append(message)
    logger.info(message)
    return dataset


def _with_split(record: ImageRecord, split: str) -> ImageRecord:
    return ImageRecord(
        image_path=record.image_path,
        person_id=record.person_id,
        captions=record.captions,
        split=split,
        camera=record.camera,
        relative_path=record.relative_path,
    )


def read_cuhk_pedes(annotation: Path, *, val_identity_fraction: float = 0.1, seed: int = 0) -> PersonSearchDataset:
    """CUHK-PEDES: ``file_path`` relative to ``imgs/``, 1-based ids, train/val/test."""
    dataset = _read_benchmark("cuhk-pedes", annotation, path_field="file_path", split_names=SPLIT_ORDER)
    dataset.notes.append("person ids are 1-based, as written in the annotation file")
    return dataset


def read_icfg_pedes(annotation: Path, *, val_identity_fraction: float = 0.1, seed: int = 0) -> PersonSearchDataset:
    """ICFG-PEDES: one caption per image, 0-based ids, train/test only (val carved from train)."""
    dataset = _read_benchmark("icfg-pedes", annotation, path_field="file_path", split_names=SPLIT_ORDER)
    dataset.notes.append("person ids are 0-based, as written in the annotation file")
    if dataset.splits.get("val"):
        dataset.notes.append("the annotation file has its own val split; it was kept as is")
        return dataset
    return carve_val_split(dataset, fraction=val_identity_fraction, seed=seed)


def read_rstpreid(annotation: Path, *, val_identity_fraction: float = 0.1, seed: int = 0) -> PersonSearchDataset:
    """RSTPReid: ``img_path`` (not ``file_path``) relative to ``imgs/``, two captions, train/val/test."""
    return _read_benchmark("rstpreid", annotation, path_field="img_path", split_names=SPLIT_ORDER)


# --------------------------------------------------------------------------- generic reader


@dataclass
class _PendingImage:
    """Rows of one image gathered before they become an ImageRecord."""

    line: int
    relative_path: str
    raw_id: str | int
    split: str | None
    camera: str | None
    captions: list[str] = field(default_factory=list)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}: line {line_number}: invalid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}: line {line_number}: expected a JSON object, got {_type_name(row)}")
            yield line_number, row


def _iter_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if header is None:
            return
        missing = [name for name in _GENERIC_REQUIRED if name not in header]
        if missing:
            raise DataFormatError(
                f"{path}: line 1: header lacks column(s) {', '.join(missing)}; found {', '.join(header)}"
            )
        # A quoted caption may span several physical lines, so track where each row starts.
        start = reader.line_num + 1
        for row in reader:
            line_number = start
            start = reader.line_num + 1
            if None in row:
                raise DataFormatError(
                    f"{path}: line {line_number}: more fields than the header has (unquoted comma in a caption?)"
                )
            if not any((value or "").strip() for value in row.values()):
                continue
            yield line_number, {key: value for key, value in row.items() if value is not None}


def _optional_str(row: dict[str, Any], key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DataFormatError(f"{where}: field {key!r} must be a string, got {_type_name(value)}")
    text = str(value).strip()
    return text or None


def read_generic(annotation: Path, *, val_identity_fraction: float = 0.1, seed: int = 0) -> PersonSearchDataset:
    """Users' own data: one row per caption (``image``, ``person_id``, ``caption``, optional ``split``, ``camera``)."""
    root = annotation.parent.resolve()
    report = LoadReport()
    rows = _iter_csv(annotation) if annotation.suffix.lower() == ".csv" else _iter_jsonl(annotation)
    images: dict[str, _PendingImage] = {}
    for line_number, row in rows:
        where = f"{annotation}: line {line_number}"
        missing = [key for key in _GENERIC_REQUIRED if row.get(key) is None]
        if missing:
            raise DataFormatError(f"{where}: missing field(s) {', '.join(missing)}")
        rel = row["image"]
        if not isinstance(rel, str) or not rel.strip():
            raise DataFormatError(f"{where}: field 'image' must be a non-empty string, got {rel!r}")
        raw_id = row["person_id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)) or not str(raw_id).strip():
            raise DataFormatError(f"{where}: field 'person_id' must be an integer or a non-empty string, got {raw_id!r}")
        raw_id = raw_id.strip() if isinstance(raw_id, str) else raw_id
        split_text = _optional_str(row, "split", where)
        split = _parse_split(split_text, where) if split_text is not None else None
        camera = _optional_str(row, "camera", where)
        caption = row["caption"]
        if not isinstance(caption, str):
            raise DataFormatError(f"{where}: field 'caption' must be a string, got {_type_name(caption)}")

        key = os.path.normpath(str(_relative_to_path(rel, root)))
        pending = images.get(key)
        if pending is None:
            pending = images[key] = _PendingImage(line_number, rel, raw_id, split, camera)
        else:
            # Rows of one image must agree on who is in it and where it belongs.
            for field_name, old, new in (("person_id", pending.raw_id, raw_id), ("split", pending.split, split)):
                if str(old) != str(new):
                    raise DataFormatError(
                        f"{where}: field {field_name!r} is {new!r} but line {pending.line} gave {old!r} "
                        f"for the same image {rel!r}"
                    )
            if camera is not None and pending.camera is not None and camera != pending.camera:
                raise DataFormatError(
                    f"{where}: field 'camera' is {camera!r} but line {pending.line} gave {pending.camera!r} "
                    f"for the same image {rel!r}"
                )
            pending.camera = pending.camera or camera
        text = _normalised_or_counted(caption, f"line {line_number}: {rel}", report)
        if text:
            pending.captions.append(text)

    notes = [f"generic annotations read from {annotation.name}; image paths relative to {root}"]
    id_map, person_names = _map_person_ids([pending.raw_id for pending in images.values()])
    if person_names:
        shown = ", ".join(f"{name}={number}" for number, name in list(person_names.items())[:_MAX_NOTE_NAMES])
        more = len(person_names) - _MAX_NOTE_NAMES
        suffix = f", ... ({more} more, see dataset.person_names)" if more > 0 else ""
        notes.append(f"string person ids mapped to integers in sorted order: {shown}{suffix}")

    any_split = any(pending.split is not None for pending in images.values())
    default_split = "train" if any_split else "test"
    if not any_split and images:
        notes.append("no row has a split: every image was put in 'test' so the folder can be evaluated or searched")

    splits: dict[str, list[ImageRecord]] = {}
    for key, pending in images.items():
        if not pending.captions:
            report.add("record_skipped_no_caption", f"line {pending.line}: {pending.relative_path}")
            continue
        split = pending.split
        if split is None:
            split = default_split
            if any_split:
                report.add("split_missing_defaulted_to_train", f"line {pending.line}: {pending.relative_path}")
        splits.setdefault(split, []).append(
            ImageRecord(
                image_path=Path(key),
                person_id=id_map[pending.raw_id],
                captions=tuple(pending.captions),
                split=split,
                camera=pending.camera,
                relative_path=pending.relative_path,
            )
        )
    if report.counts.get("split_missing_defaulted_to_train"):
        notes.append(
            f"{report.counts['split_missing_defaulted_to_train']} image(s) had no split while others did; "
            "they were put in 'train'"
        )
    return PersonSearchDataset(
        name="generic",
        root=root,
        splits=_ordered_splits(splits),
        report=report,
        notes=notes,
        person_names=person_names,
    )


def _map_person_ids(raw_ids: list[str | int]) -> tuple[dict[str | int, int], dict[int, str]]:
    """Integer ids stay as they are; if any id is not an integer, all map to 0..n-1 in sorted order."""
    def as_int(value: str | int) -> int | None:
        if isinstance(value, int):
            return value
        text = value.strip()
        return int(text) if _INTEGER.fullmatch(text) else None

    numbers = {raw: as_int(raw) for raw in raw_ids}
    if all(number is not None for number in numbers.values()):
        return {raw: number for raw, number in numbers.items()}, {}  # type: ignore[misc]
    # Sorting the string forms makes the mapping stable across runs and row orders.
    names = sorted({str(raw) for raw in raw_ids})
    index = {name: number for number, name in enumerate(names)}
    return {raw: index[str(raw)] for raw in raw_ids}, {number: name for name, number in index.items()}


Reader = Callable[..., PersonSearchDataset]

READERS: dict[str, Reader] = {
    "cuhk-pedes": read_cuhk_pedes,
    "icfg-pedes": read_icfg_pedes,
    "rstpreid": read_rstpreid,
    "generic": read_generic,
}
