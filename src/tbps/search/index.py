"""Gallery index on disk: build, resume, append, open and verify.

An index is a directory::

    manifest.json        format version, method, feature size, config, checkpoint hash, counts,
                         FAISS settings, file checksums, build report
    global.faiss         FAISS index over L2-normalised global image embeddings (inner product)
    global.npy           the same embeddings, float32 (exact re-scoring, "more like this", RVN)
    local_<name>.npy     the method's other image features, float16, opened memory-mapped
    metadata.json        one entry per image: path, width, height, camera, timestamp, person id

The manifest also records the *image roots*: the resolved folders the images were indexed from.
``tbps serve`` reads image files only inside them (see :mod:`tbps.search.images`). A folder scan
passes over symbolic links unless asked (``follow_symlinks``); even then it follows a link only
when its target lies inside the scanned folder or inside one of the ``link_roots`` named with
it, which then become image roots too. A link planted in a shared folder therefore never makes
the index (and the server) reach a file its owner did not name. Images whose header declares
more than ``max_pixels`` pixels are skipped undecoded, like unreadable ones.

A build writes into ``.<name>.building`` beside the target, keeping one feature file per
completed batch plus ``progress.json``; only a finished build is renamed into place, so an
interrupted build never leaves a half-written index and ``resume=True`` restarts after the
last completed batch.

Every writer (a build, ``--resume`` included, and an add) holds the index's *write lock*, an
exclusive ``flock`` on ``.<name>.lock`` beside the index holding the writer's pid, from before
it reads the index until its result is renamed into place: two adds at once are serialised
(``wait`` seconds) or the second fails naming the first's pid, instead of sharing working
folders and losing one's images. The lock lives beside the index, not in it, because every
write replaces the index folder. ``overwrite`` replaces only a folder holding a tbps index
and nothing else, never a folder with other files (such as the images being indexed).

Opening an index checks its manifest (every key the code reads, with its type), every listed
file's size and, for files up to ``OPEN_HASH_LIMIT`` bytes, its sha256; ``verify_index``
hashes every file.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import faiss
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tbps.data.records import ImageLoadError
from tbps.data.transforms import ImageTransform
from tbps.models.base import PersonSearchMethod
from tbps.search.images import (
    DEFAULT_MAX_PIXELS,
    ImageAccessError,
    check_max_pixels,
    decode_image,
    is_inside,
    open_inside_roots,
    real_roots,
)
from tbps.utils import atomic_write, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.json"
GLOBAL_INDEX = "global.faiss"
GLOBAL_VECTORS = "global.npy"
PROGRESS = "progress.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")
# Sizes at which "auto" switches to an approximate index: an exact scan of 100k x 256 floats
# already costs ~100 MB of memory traffic per query.
EXACT_LIMIT = 100_000
HNSW_LIMIT = 2_000_000
# Files up to this size are hashed each time an index is opened: sha256 runs at about 1.2 GB/s
# here (64 MiB in 0.055 s), so each such file costs at most ~30 ms, and metadata.json stays
# under it up to ~130k images (global.npy up to ~32k images at 256-d). Larger files get a size
# check on open and their hash from `tbps index verify`.
OPEN_HASH_LIMIT = 32 * 1024 * 1024
# Index files a build writes; `overwrite` replaces a folder only if it holds nothing else.
INDEX_FILE_PATTERN = re.compile(r"(manifest\.json|metadata\.json|global\.faiss|global\.npy|local_[A-Za-z0-9_]+\.npy)")

ProgressCallback = Callable[[int, int], None]


class SearchIndexError(ValueError):
    """Base error of the search index (a missing, damaged or incompatible index)."""


class IndexCompatibilityError(SearchIndexError):
    """A checkpoint whose method or feature size does not match the index."""


class IndexLockedError(SearchIndexError):
    """Another process is writing the index (it holds the index's write lock)."""


@dataclass(frozen=True)
class ImageSource:
    """One image to index, with whatever metadata is already known."""

    path: Path
    relative_path: str
    camera: str | None = None
    timestamp: str | None = None
    person_id: int | None = None
    # The folder the image was found in (resolved); the image must stay inside it. None: the
    # image's own folder.
    root: Path | None = None

    @property
    def image_root(self) -> Path:
        return Path(os.path.realpath(self.root if self.root is not None else Path(self.path).parent))


class FolderScan(list):
    """What :func:`scan_folder` found: a list of :class:`ImageSource`, plus ``roots`` (the
    resolved folder, then the link roots) and ``skipped`` (entries passed over, each
    ``{"path", "reason"}``, reported by the build)."""

    def __init__(self, sources: Sequence[ImageSource], roots: Sequence[Path], skipped: list[dict[str, str]]) -> None:
        super().__init__(sources)
        self.roots = tuple(roots)
        self.skipped = skipped


@dataclass
class BuildReport:
    """What a build or an add did: counts and every skipped image with its reason."""

    indexed: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_batch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"indexed": self.indexed, "skipped_count": len(self.skipped), **asdict(self)}


# --------------------------------------------------------------------------- image sources
def parse_timestamp(text: str | None) -> str | None:
    """Normalise a timestamp to ISO 8601 (``YYYY-MM-DDTHH:MM:SS``) so strings compare in time order."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    for candidate in (text, text.replace("_", "T")):
        try:
            return datetime.fromisoformat(candidate).replace(tzinfo=None).isoformat(timespec="seconds")
        except ValueError:
            pass
    for fmt in ("%Y%m%dT%H%M%S", "%Y%m%d%H%M%S", "%Y%m%d-%H%M%S", "%Y%m%d_%H%M%S", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).isoformat(timespec="seconds")
        except ValueError:
            pass
    raise ValueError(f"cannot parse timestamp {text!r}; use ISO 8601 (2024-05-01T13:45:00) or YYYYMMDDTHHMMSS")


def _metadata_from_pattern(relative_path: str, pattern: re.Pattern[str] | None) -> dict[str, str | None]:
    if pattern is None:
        return {}
    match = pattern.search(relative_path)
    if match is None:
        return {}
    groups = match.groupdict()
    out: dict[str, str | None] = {}
    if groups.get("camera"):
        out["camera"] = groups["camera"]
    if groups.get("timestamp"):
        try:
            out["timestamp"] = parse_timestamp(groups["timestamp"])
        except ValueError:
            out["timestamp"] = None
    return out


def read_sidecar_csv(path: str | os.PathLike) -> dict[str, dict[str, str | None]]:
    """``path,camera,timestamp`` rows (path relative to the image folder) -> metadata by path."""
    rows: dict[str, dict[str, str | None]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"sidecar CSV {str(path)!r} needs a header with a 'path' column (and camera, timestamp)")
        for line, row in enumerate(reader, start=2):
            key = (row.get("path") or "").strip().replace(os.sep, "/")
            if not key:
                raise ValueError(f"sidecar CSV {str(path)!r} line {line}: empty path")
            try:
                timestamp = parse_timestamp(row.get("timestamp"))
            except ValueError as error:
                raise ValueError(f"sidecar CSV {str(path)!r} line {line}: {error}") from None
            rows[key] = {"camera": (row.get("camera") or "").strip() or None, "timestamp": timestamp}
    return rows


def scan_folder(
    folder: str | os.PathLike,
    *,
    pattern: str | None = None,
    sidecar: str | os.PathLike | None = None,
    follow_symlinks: bool = False,
    link_roots: Sequence[str | os.PathLike] = (),
) -> FolderScan:
    """Every image file under ``folder`` (recursive, sorted), with camera / timestamp metadata.

    ``pattern`` is a regular expression searched in the relative path whose named groups
    ``camera`` and ``timestamp`` fill the metadata; ``sidecar`` is a CSV that overrides it.

    Symbolic links (to files or folders) are passed over and reported unless ``follow_symlinks``.
    With it, a link is followed when its target lies inside ``folder`` or inside one of
    ``link_roots`` (folders elsewhere that links may point into, e.g. the originals of a folder
    of links); others are reported. Each target folder is walked once, so link loops end, and a
    file reached twice is indexed once. Non-regular files (FIFOs, devices) with an image's name
    are always passed over. Each source's ``path`` is its resolved location and its ``root`` the
    allowed folder holding it.

    Nothing is dropped silently: besides the above, ``skipped`` lists folders that cannot be read
    (their images are missing from the index) and dangling symbolic links of any name (one may
    have pointed at a folder of images, e.g. an unmounted share).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if link_roots and not follow_symlinks:
        raise ValueError("link_roots (--link-root) name where followed links may point: pass follow_symlinks (--follow-symlinks) too")
    for extra in link_roots:
        if not Path(extra).is_dir():
            raise FileNotFoundError(f"link root {str(extra)!r} is not a folder")
    allowed = real_roots([root, *link_roots])
    real_root = allowed[0]
    compiled = re.compile(pattern) if pattern else None
    side = read_sidecar_csv(sidecar) if sidecar else {}
    skipped: list[dict[str, str]] = []
    not_followed = "symbolic link, not followed (--follow-symlinks follows links into the folder or a --link-root)"
    found: list[tuple[Path, Path]] = []  # (path as walked, resolved path)
    visited = {real_root}

    def unreadable(error: OSError) -> None:
        # os.walk skips a folder it cannot list without a word unless told (onerror).
        skipped.append({"path": str(error.filename), "reason": f"folder cannot be read ({error.strerror or error}); the images in it are not indexed"})

    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks, onerror=unreadable):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            sub = here / name
            target = Path(os.path.realpath(sub))
            if sub.is_symlink() and not follow_symlinks:
                skipped.append({"path": str(sub), "reason": not_followed})
            elif not is_inside(target, allowed):
                skipped.append({"path": str(sub), "reason": f"symbolic link to a folder outside the indexed folder and link roots ({target})"})
            elif target in visited:
                skipped.append({"path": str(sub), "reason": f"folder {target} is already indexed through another path"})
            else:
                visited.add(target)
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            path = here / name
            dangling = _dangling_link(path)
            if dangling is not None:
                skipped.append({"path": str(path), "reason": dangling})
                continue
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode) and not follow_symlinks:
                    skipped.append({"path": str(path), "reason": not_followed})
                    continue
                real = Path(os.path.realpath(path))
                if not is_inside(real, allowed):
                    skipped.append({"path": str(path), "reason": f"symbolic link to a file outside the indexed folder and link roots ({real})"})
                    continue
                if not stat.S_ISREG(os.stat(real).st_mode):
                    skipped.append({"path": str(path), "reason": "not a regular file"})
                    continue
            except OSError as error:  # a dangling link, a file removed while scanning
                skipped.append({"path": str(path), "reason": str(error)})
                continue
            found.append((path, real))
    # A file reached twice is kept under the path that involves no link (else the first in order).
    seen: dict[Path, Path] = {}
    for path, real in sorted(found, key=lambda item: (item[1] != real_root / item[0].relative_to(root), item[0])):
        if real in seen:
            skipped.append({"path": str(path), "reason": f"same file as {seen[real]}"})
        else:
            seen[real] = path
    sources = []
    for real, path in sorted(((real, path) for real, path in seen.items()), key=lambda item: item[1]):
        relative = path.relative_to(root).as_posix()
        meta = {**_metadata_from_pattern(relative, compiled), **{k: v for k, v in side.get(relative, {}).items() if v}}
        holder = next(r for r in allowed if is_inside(real, (r,)))
        sources.append(ImageSource(real, relative, meta.get("camera"), meta.get("timestamp"), root=holder))
    return FolderScan(sources, allowed, skipped)


def _dangling_link(path: Path) -> str | None:
    """The reason to report ``path`` if it is a symbolic link whose target does not exist."""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode) or os.path.exists(path):
            return None
        target = os.readlink(path)
    except OSError:
        return None  # removed while scanning: nothing left to report
    return f"dangling symbolic link: its target {target} does not exist"


def dataset_sources(name: str, root: str | os.PathLike, split: str = "test") -> list[ImageSource]:
    """The images of one split of a benchmark dataset (camera and person id from its annotation)."""
    from tbps.data.readers import load_dataset

    dataset = load_dataset(name, root)
    real_root = Path(os.path.realpath(root))
    # The dataset root is the image root: an annotation naming a file outside it is skipped at build.
    return [
        ImageSource(Path(r.image_path), r.relative_path or Path(r.image_path).name, r.camera, None, int(r.person_id), real_root)
        for r in dataset.split(split)
    ]


# --------------------------------------------------------------------------- encoding
class _IndexImages(Dataset):
    """Decoded and transformed images; unreadable, oversized (over ``max_pixels``, never decoded)
    and out-of-root files come back as their error message."""

    def __init__(self, sources: Sequence[ImageSource], transform: ImageTransform, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.sources = sources
        self.transform = transform
        self.max_pixels = check_max_pixels(max_pixels)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, tuple[int, int], str | None]:
        source = self.sources[index]
        try:
            with open_inside_roots(source.path, (source.image_root,)) as handle:
                image = decode_image(handle, max_pixels=self.max_pixels, name=source.path)
        except ImageLoadError as error:
            return index, None, (0, 0), error.reason
        except ImageAccessError as error:
            return index, None, (0, 0), str(error)
        except OSError as error:
            return index, None, (0, 0), error.strerror or str(error)
        return index, self.transform(image), image.size, None


def _collate(items: list) -> list:
    return items


def image_transform(method: PersonSearchMethod, image_size: Sequence[int]) -> ImageTransform:
    """The evaluation transform the method was trained with."""
    mean, std = method.image_mean_std
    return ImageTransform((int(image_size[0]), int(image_size[1])), mean, std, train=False)


@torch.no_grad()
def encode_images(method: PersonSearchMethod, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Image batch -> numpy features: ``global`` L2-normalised float32, every other key float16."""
    features = method.encode_image(images)
    out: dict[str, np.ndarray] = {}
    for key, value in features.items():
        value = value.detach().float().cpu()
        if key == "global":
            out[key] = torch.nn.functional.normalize(value, dim=-1).numpy().astype(np.float32)
        else:
            out[key] = value.numpy().astype(np.float16)
    return out


def _progress_digest(checkpoint_hash: str, sources: Sequence[ImageSource], batch_size: int, max_pixels: int) -> str:
    """Identifies a build so ``--resume`` only continues the same build."""
    digest = hashlib.sha256(f"{checkpoint_hash}\n{batch_size}\n{max_pixels}\n".encode())
    for source in sources:
        digest.update(f"{source.path}\t{source.camera}\t{source.timestamp}\t{source.person_id}\t{source.image_root}\n".encode())
    return digest.hexdigest()


def _encode_into(
    method: PersonSearchMethod,
    transform: ImageTransform,
    sources: Sequence[ImageSource],
    work_dir: Path,
    *,
    digest: str,
    batch_size: int,
    num_workers: int,
    resume: bool,
    device: str,
    on_batch: ProgressCallback | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> int:
    """Encode ``sources`` batch by batch into ``work_dir/batches``; returns the first batch run now."""
    batch_dir = work_dir / "batches"
    progress_path = work_dir / PROGRESS
    done = 0
    if resume and progress_path.is_file():
        state = json.loads(progress_path.read_text())
        if state.get("digest") != digest:
            raise SearchIndexError(
                f"cannot resume: the unfinished build in {str(work_dir)!r} used another checkpoint, image list "
                "or batch size; run without --resume to start over"
            )
        done = int(state["completed_batches"])
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    batch_dir.mkdir(parents=True, exist_ok=True)
    num_batches = math.ceil(len(sources) / batch_size)
    start_batch = done
    remaining = list(range(done * batch_size, len(sources)))
    if remaining:
        loader = DataLoader(
            torch.utils.data.Subset(_IndexImages(sources, transform, max_pixels), remaining),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        for batch_number, items in enumerate(loader, start=done):
            good = [item for item in items if item[1] is not None]
            payload: dict[str, np.ndarray] = {
                "index": np.array([item[0] for item in good], dtype=np.int64),
                "size": np.array([item[2] for item in good], dtype=np.int64).reshape(-1, 2),
            }
            if good:
                images = torch.stack([item[1] for item in good]).to(device)
                payload.update({f"feature:{k}": v for k, v in encode_images(method, images).items()})
            skipped = [{"path": str(sources[i].path), "reason": reason} for i, _, _, reason in items if reason is not None]
            with atomic_write(batch_dir / f"{batch_number:07d}.npz", "wb") as handle:
                np.savez(handle, skipped=np.array(json.dumps(skipped)), **payload)
            # The progress file is written after the batch file, so it never counts a missing batch.
            with atomic_write(progress_path) as handle:
                json.dump({"digest": digest, "completed_batches": batch_number + 1, "total_batches": num_batches}, handle)
            if on_batch is not None:
                on_batch(batch_number + 1, num_batches)
    return start_batch


def _gather_batches(work_dir: Path, sources: Sequence[ImageSource]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], list[dict[str, str]]]:
    """Concatenate the per-batch files: (features, metadata rows, skipped images)."""
    chunks: dict[str, list[np.ndarray]] = {}
    metadata: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for path in sorted((work_dir / "batches").glob("*.npz")):
        with np.load(path, allow_pickle=False) as batch:
            skipped.extend(json.loads(str(batch["skipped"])))
            for key in batch.files:
                if key.startswith("feature:"):
                    chunks.setdefault(key.removeprefix("feature:"), []).append(batch[key])
            for index, (width, height) in zip(batch["index"].tolist(), batch["size"].tolist()):
                source = sources[index]
                metadata.append(
                    {
                        "path": str(source.path),
                        "relative_path": source.relative_path,
                        "width": int(width),
                        "height": int(height),
                        "camera": source.camera,
                        "timestamp": source.timestamp,
                        "person_id": source.person_id,
                    }
                )
    features = {key: np.concatenate(parts) for key, parts in chunks.items()}
    return features, metadata, skipped


# --------------------------------------------------------------------------- FAISS
def choose_index_kind(count: int, kind: str = "auto") -> str:
    """``auto``: exact below 100k images, HNSW up to 2M, IVF-PQ beyond (memory)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    if count <= EXACT_LIMIT:
        return "flat"
    return "hnsw" if count <= HNSW_LIMIT else "ivfpq"


def make_faiss_index(vectors: np.ndarray, kind: str) -> tuple[faiss.Index, dict[str, Any]]:
    """A trained FAISS inner-product index holding ``vectors`` (rows already L2-normalised)."""
    count, dim = vectors.shape
    kind = choose_index_kind(count, kind)
    params: dict[str, Any] = {"kind": kind}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        params["ef_search"] = 128
    elif kind in ("ivf", "ivfpq"):
        # ~4 sqrt(n) lists, at least 39 training points per list as FAISS recommends.
        nlist = max(1, min(int(4 * math.sqrt(count)), count // 39))
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            sub = next(m for m in (32, 16, 8, 4, 2, 1) if dim % m == 0)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, sub, 8, faiss.METRIC_INNER_PRODUCT)
            params["pq_subquantizers"] = sub
        # 64 training points per list is enough for stable centroids and keeps k-means on 1M
        # images to about a minute on two cores (FAISS's own cap is 256 per list).
        rng = np.random.default_rng(0)
        train = vectors if count <= 64 * nlist else vectors[np.sort(rng.choice(count, 64 * nlist, replace=False))]
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        # Probing an eighth of the lists keeps recall@10 around 0.9 on embedding-like data
        # (benchmarks/bench_search.py) at an eighth of an exact scan's cost.
        params.update(nlist=nlist, nprobe=min(nlist, max(32, nlist // 8)))
    else:  # pragma: no cover - choose_index_kind rejects the rest
        raise ValueError(kind)
    if count:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index, params


# --------------------------------------------------------------------------- writing
def _write_index_files(
    out_dir: Path,
    features: Mapping[str, np.ndarray],
    metadata: list[dict[str, Any]],
    index: faiss.Index,
    manifest: dict[str, Any],
) -> None:
    """Write every file of an index into ``out_dir``, manifest (with checksums) last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / GLOBAL_INDEX, "wb") as handle:
        handle.write(faiss.serialize_index(index).tobytes())
    files = [GLOBAL_INDEX, GLOBAL_VECTORS, METADATA]
    with atomic_write(out_dir / GLOBAL_VECTORS, "wb") as handle:
        np.save(handle, np.ascontiguousarray(features["global"], dtype=np.float32))
    local_shapes = {}
    for key, value in features.items():
        if key == "global":
            continue
        name = f"local_{key}.npy"
        with atomic_write(out_dir / name, "wb") as handle:
            np.save(handle, np.ascontiguousarray(value, dtype=np.float16))
        files.append(name)
        local_shapes[key] = list(value.shape[1:])
    with atomic_write(out_dir / METADATA) as handle:
        json.dump(metadata, handle)
    manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "image_count": len(metadata),
        "feature_dim": int(features["global"].shape[1]),
        "local_features": local_shapes,
        "files": {name: sha256_file(out_dir / name) for name in files},
        # Sizes let every open catch a truncated or replaced file without hashing it.
        "file_sizes": {name: (out_dir / name).stat().st_size for name in files},
    }
    with atomic_write(out_dir / MANIFEST) as handle:
        json.dump(manifest, handle, indent=2)


def _checkpoint_info(
    checkpoint: str | os.PathLike, *, prompt: str | None = None, image_size: Sequence[int] | None = None
) -> tuple[PersonSearchMethod, dict[str, Any], dict[str, Any]]:
    """The model (a checkpoint, or CLIP weights: :func:`tbps.engine.checkpoint.open_model_source`)
    and what the manifest records about it: its path, the hash of its files, its image size."""
    from tbps.engine.checkpoint import open_model_source

    loaded = open_model_source(checkpoint, prompt, image_size=image_size)
    info = {
        "method": loaded.config["method"],
        **loaded.manifest_info(),
        "image_size": [int(v) for v in loaded.config["data"]["image_size"]],
    }
    return loaded.method, loaded.config, info


def _working_dir(out_dir: Path, suffix: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{suffix}"


# --------------------------------------------------------------------------- write lock
LOCK_POLL_SECONDS = 0.1


def lock_path(index_dir: str | os.PathLike) -> Path:
    """The write lock of an index: ``.<name>.lock`` beside it (the folder itself is replaced by
    every write, so a lock file inside it would be swapped away with it)."""
    return _working_dir(Path(index_dir), "lock")


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process (it has not written its pid yet)"


@contextlib.contextmanager
def index_write_lock(index_dir: str | os.PathLike, wait: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive write lock of ``index_dir`` (see the module docstring).

    ``wait``: seconds to wait for another writer to finish; after that (at once with 0)
    :class:`IndexLockedError` names the holder's pid. The lock is an ``flock`` (released by the
    system if the holder dies, so it is never stale); the file holds the holder's pid and is
    removed on release, while still locked, so a waiter that opened it before re-opens the new
    one instead of locking a file that is no longer there.
    """
    import fcntl  # POSIX only, as is the rest of the index's file handling

    if wait < 0 or not math.isfinite(wait):
        raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
    path = lock_path(index_dir)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after waiting {wait:g} s" if wait else ""
                raise IndexLockedError(
                    f"index {str(index_dir)!r} is being written by {holder}{waited} (lock {str(path)!r}); "
                    "wait for it to finish, or pass --wait SECONDS (wait=) to wait for it"
                ) from None
            time.sleep(min(LOCK_POLL_SECONDS, left))
            continue
        except BaseException:
            os.close(fd)
            raise
        try:
            opened, named = os.fstat(fd), os.stat(path)
            current = (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)
        except FileNotFoundError:
            current = False
        if not current:  # the previous holder removed this file after we opened it: try the new one
            os.close(fd)
            continue
        break
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the flock


OVERWRITE_HINT = "--overwrite only replaces an existing tbps index; choose another --out or remove it yourself"
ADD_HINT = "an add replaces the index folder with the updated index: move them out of it first"


def _check_replaceable(out_dir: Path, sources: Sequence[ImageSource], hint: str = OVERWRITE_HINT) -> None:
    """Refuse to replace anything but a folder holding a tbps index and only its files: never a
    file, a link, another folder, or one that holds images (``hint`` says what to do)."""
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise FileExistsError(f"{str(out_dir)!r} is {'a symbolic link' if out_dir.is_symlink() else 'not a folder'}; {hint}")
    real_out = Path(os.path.realpath(out_dir))
    inside = next((s for s in sources if is_inside(os.path.realpath(s.path), (real_out,)) or is_inside(s.image_root, (real_out,))), None)
    if inside is not None:
        raise FileExistsError(f"{str(out_dir)!r} holds the images being indexed (e.g. {str(inside.path)!r}); {hint}")
    if not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"{str(out_dir)!r} is not a tbps index (no {MANIFEST}); {hint}")
    foreign = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(out_dir)
                     if not (INDEX_FILE_PATTERN.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)))
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{str(out_dir)!r} holds files that are not part of a tbps index ({shown}); {hint}")


def build_index(
    checkpoint: str | os.PathLike,
    sources: Sequence[ImageSource],
    out_dir: str | os.PathLike,
    *,
    kind: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    on_batch: ProgressCallback | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prompt: str | None = None,
    wait: float = 0.0,
) -> BuildReport:
    """Embed ``sources`` with the checkpoint's method and write a complete index to ``out_dir``.

    ``checkpoint`` may be CLIP weights instead (zero-shot; a Hugging Face CLIP folder or OpenAI's
    file); ``prompt`` is then the text template searches use by default (recorded in the config).

    ``sources`` from :func:`scan_folder` carry the entries the scan passed over (symbolic links,
    non-regular files, unreadable folders); they are reported with the unreadable and oversized
    images.

    ``overwrite`` replaces ``out_dir`` only if it is a folder holding a tbps index and nothing
    else (never the images). The build holds the index's write lock throughout (``wait``:
    seconds to wait for another writer, see :func:`index_write_lock`).
    """
    out_dir = Path(out_dir)
    check_max_pixels(max_pixels)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not sources:
        raise ValueError("no images to index" + _skipped_hint(_scan_skipped(sources)))
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # for the lock file; the index's own files go there too
    with index_write_lock(out_dir, wait):
        # Checked again under the lock: another build may have created out_dir meanwhile.
        if out_dir.exists() or out_dir.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{str(out_dir)!r} already exists; pass overwrite=True (--overwrite) to replace it")
            _check_replaceable(out_dir, sources)
        started = time.perf_counter()
        method, config, info = _checkpoint_info(checkpoint, prompt=prompt)
        method.to(device)
        work_dir = _working_dir(out_dir, "building")
        digest = _progress_digest(info["checkpoint_sha256"], sources, batch_size, max_pixels)
        transform = image_transform(method, info["image_size"])
        first = _encode_into(method, transform, sources, work_dir, digest=digest, batch_size=batch_size,
                             num_workers=num_workers, resume=resume, device=device, on_batch=on_batch, max_pixels=max_pixels)
        features, metadata, skipped = _gather_batches(work_dir, sources)
        skipped = _scan_skipped(sources) + skipped
        if not metadata:
            raise ValueError(f"none of the {len(sources)} images could be read (first: {skipped[0]['reason'] if skipped else '?'})")
        index, faiss_params = make_faiss_index(features["global"], kind)
        report = BuildReport(indexed=len(metadata), skipped=skipped, seconds=time.perf_counter() - started, resumed_from_batch=first)
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        manifest = {**info, "config": config, "faiss": faiss_params, "created": now, "updated": now,
                    "image_roots": _source_roots(sources), "max_pixels": max_pixels, "build_report": report.to_dict()}
        final_dir = _working_dir(out_dir, "final")
        shutil.rmtree(final_dir, ignore_errors=True)
        _write_index_files(final_dir, features, metadata, index, manifest)
        _swap_into_place(final_dir, out_dir, sources)
        shutil.rmtree(work_dir, ignore_errors=True)
        return report


def _scan_skipped(sources: Sequence[ImageSource]) -> list[dict[str, str]]:
    return list(sources.skipped) if isinstance(sources, FolderScan) else []


def _skipped_hint(skipped: Sequence[Mapping[str, str]]) -> str:
    if not skipped:
        return ""
    return f" ({len(skipped)} entries passed over, first: {skipped[0]['path']}: {skipped[0]['reason']})"


def _source_roots(sources: Sequence[ImageSource], known: Sequence[str] = ()) -> list[str]:
    """The resolved image roots of ``sources`` added to ``known``, sorted."""
    return sorted(set(known) | {str(source.image_root) for source in sources})


def _swap_into_place(new_dir: Path, out_dir: Path, sources: Sequence[ImageSource], hint: str = OVERWRITE_HINT) -> None:
    """Rename a finished index over ``out_dir``; the old one is removed only after the rename,
    and only if it still holds nothing but an index (checked again: the write took a while)."""
    old_dir = _working_dir(out_dir, "old")
    shutil.rmtree(old_dir, ignore_errors=True)
    if out_dir.exists() or out_dir.is_symlink():
        _check_replaceable(out_dir, sources, hint)
        os.replace(out_dir, old_dir)
    os.replace(new_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


# --------------------------------------------------------------------------- reading
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: Any) -> bool:
    """A plain file name inside the index folder (no separator, not . or ..)."""
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", value) is not None


# Every manifest key the code reads, with the check its value must pass and what that means.
# The optional ones are absent from indexes written before they were recorded.
MANIFEST_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "method": (lambda v: isinstance(v, str) and bool(v), "a method name"),
    "checkpoint": (lambda v: isinstance(v, str) and bool(v), "a path"),
    "checkpoint_sha256": (lambda v: isinstance(v, str) and bool(v), "a sha256 hex string"),
    "image_count": (lambda v: _is_int(v) and v >= 0, "a count"),
    "feature_dim": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "local_features": (lambda v: isinstance(v, dict) and all(re.fullmatch(r"[A-Za-z0-9_]+", str(k)) and isinstance(d, list) for k, d in v.items()),
                       "a mapping of feature names to shapes"),
    "faiss": (lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str), "a mapping with the FAISS 'kind'"),
    "files": (lambda v: isinstance(v, dict) and all(_is_name(k) and isinstance(h, str) for k, h in v.items()),
              "a mapping of file names to sha256 strings"),
}
OPTIONAL_MANIFEST_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "file_sizes": (lambda v: isinstance(v, dict) and all(_is_int(n) and n >= 0 for n in v.values()), "a mapping of file names to sizes"),
    "image_roots": (lambda v: isinstance(v, list) and all(isinstance(r, str) and os.path.isabs(r) for r in v), "a list of absolute paths"),
    "max_pixels": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "image_size": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(n) and n >= 1 for n in v), "[height, width]"),
    "build_report": (lambda v: isinstance(v, dict), "a mapping"),
    "config": (lambda v: isinstance(v, dict), "a mapping"),
}


def manifest_signature(index_dir: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """Identifies the manifest now on disk (device, inode, modification time, size; None if
    there is none). Every write renames a new index folder into place, so it changes with
    every build and add: a server stats it to notice (one ``stat``, microseconds)."""
    try:
        info = os.stat(Path(index_dir) / MANIFEST)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an index, checked: :class:`SearchIndexError` naming every missing or
    malformed key (never a KeyError later)."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise SearchIndexError(f"{str(index_dir)!r} is not a tbps index (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSON or UTF-8 errors
        raise SearchIndexError(f"{str(path)!r} is damaged: {error}") from None
    if not isinstance(manifest, dict):
        raise SearchIndexError(f"{str(path)!r} is damaged: it holds a {type(manifest).__name__}, not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SearchIndexError(
            f"index {str(index_dir)!r} has format version {manifest.get('format_version')!r}; "
            f"this tbps reads version {FORMAT_VERSION}: rebuild it with `tbps index build`"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    malformed = [f"{key} (expected {what})" for key, (valid, what) in {**MANIFEST_KEYS, **OPTIONAL_MANIFEST_KEYS}.items()
                 if key in manifest and not valid(manifest[key])]
    if not missing and not malformed:
        needed = [GLOBAL_INDEX, GLOBAL_VECTORS, METADATA, *(f"local_{key}.npy" for key in manifest["local_features"])]
        missing = [f"files[{name!r}]" for name in needed if name not in manifest["files"]]
    if missing or malformed:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"malformed {', '.join(malformed)}"] if malformed else [])
        raise SearchIndexError(
            f"index {str(index_dir)!r} has a damaged {MANIFEST} ({'; '.join(parts)}): "
            "rebuild it with `tbps index build --overwrite`"
        )
    return manifest


def check_compatible(manifest: Mapping[str, Any], method: PersonSearchMethod, method_name: str, checkpoint_hash: str | None = None, feature_dim: int | None = None) -> None:
    """Refuse a checkpoint whose method, feature size or weights differ from the index's."""
    if method_name != manifest["method"]:
        raise IndexCompatibilityError(
            f"the index was built with method {manifest['method']!r}, the checkpoint holds {method_name!r}; "
            "queries would be embedded in another space: use the index's checkpoint or rebuild the index"
        )
    if feature_dim is not None and feature_dim != manifest["feature_dim"]:
        raise IndexCompatibilityError(
            f"the index holds {manifest['feature_dim']}-d features, the checkpoint produces {feature_dim}-d ones; "
            "rebuild the index with this checkpoint"
        )
    if checkpoint_hash is not None and checkpoint_hash != manifest["checkpoint_sha256"]:
        raise IndexCompatibilityError(
            f"the checkpoint differs from the one the index was built with (sha256 {checkpoint_hash[:12]} vs "
            f"{manifest['checkpoint_sha256'][:12]}): same method and size, but other weights give incomparable "
            "embeddings; rebuild the index"
        )


def probe_feature_dim(method: PersonSearchMethod, image_size: Sequence[int]) -> int:
    """Size of the method's global image feature, from one blank image."""
    with torch.no_grad():
        blank = torch.zeros(1, 3, int(image_size[0]), int(image_size[1]))
        return int(method.encode_image(blank)["global"].shape[-1])


@dataclass
class GalleryIndex:
    """An opened index: FAISS index, embeddings (memory-mapped), local features and metadata."""

    path: Path
    manifest: dict[str, Any]
    faiss_index: faiss.Index
    vectors: np.ndarray
    local: dict[str, np.ndarray]
    metadata: list[dict[str, Any]]
    # The manifest file's identity when it was read (:func:`manifest_signature`).
    signature: tuple[int, int, int, int] | None = None

    @classmethod
    def open(cls, index_dir: str | os.PathLike, *, hash_limit: int = OPEN_HASH_LIMIT) -> "GalleryIndex":
        """Open an index after checking its manifest, the size of every file it lists and the
        sha256 of those up to ``hash_limit`` bytes (0: sizes only); :class:`SearchIndexError`
        names what is wrong. A flipped byte in a larger file is found by :func:`verify_index`."""
        path = Path(index_dir)
        signature = manifest_signature(path)
        manifest = read_manifest(path)
        problems = file_problems(path, manifest, hash_limit=hash_limit)
        if problems:
            raise SearchIndexError(
                f"index {str(path)!r} is damaged: {'; '.join(problems)}; run `tbps index verify` and rebuild it"
            )
        try:
            faiss_index = faiss.deserialize_index(np.fromfile(path / GLOBAL_INDEX, dtype=np.uint8))
            vectors = np.load(path / GLOBAL_VECTORS, mmap_mode="r", allow_pickle=False)
            local = {key: np.load(path / f"local_{key}.npy", mmap_mode="r", allow_pickle=False) for key in manifest["local_features"]}
            metadata = json.loads((path / METADATA).read_text())
        except (OSError, ValueError, RuntimeError) as error:
            raise SearchIndexError(f"index {str(path)!r} is damaged or incomplete: {error}; run `tbps index verify`") from error
        if not isinstance(metadata, list) or not all(isinstance(row, dict) and isinstance(row.get("path"), str) for row in metadata):
            raise SearchIndexError(f"index {str(path)!r} is damaged: {METADATA} is not a list of image entries with a path; rebuild it")
        if vectors.ndim != 2 or vectors.shape[1] != manifest["feature_dim"]:
            raise SearchIndexError(
                f"index {str(path)!r} is inconsistent: {GLOBAL_VECTORS} holds shape {tuple(vectors.shape)}, "
                f"the manifest says {manifest['feature_dim']}-d features; rebuild it"
            )
        count = manifest["image_count"]
        if faiss_index.ntotal != count or len(vectors) != count or len(metadata) != count:
            raise SearchIndexError(
                f"index {str(path)!r} is inconsistent: manifest {count} images, FAISS {faiss_index.ntotal}, "
                f"vectors {len(vectors)}, metadata {len(metadata)}; rebuild it"
            )
        params = manifest.get("faiss", {})
        if "nprobe" in params:
            faiss.extract_index_ivf(faiss_index).nprobe = int(params["nprobe"])
        if "ef_search" in params:
            faiss_index.hnsw.efSearch = int(params["ef_search"])
        return cls(path, manifest, faiss_index, vectors, local, metadata, signature)

    def __len__(self) -> int:
        return len(self.metadata)

    @functools.cached_property
    def image_roots(self) -> tuple[Path, ...]:
        """The folders image files are read from: the manifest's ``image_roots``; for an index
        built before they were recorded, the folders of the indexed files themselves. (Computed
        once: the server asks on every image request.)"""
        roots = self.manifest.get("image_roots")
        if roots is None:
            roots = sorted({os.path.dirname(row["path"]) for row in self.metadata})
        return real_roots(roots)

    def image_features(self, ids: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Global and local features of some images as float32 tensors, in ``ids`` order."""
        ids = np.asarray(ids, dtype=np.int64)
        features = {"global": torch.from_numpy(np.asarray(self.vectors[ids], dtype=np.float32))}
        for key, values in self.local.items():
            features[key] = torch.from_numpy(np.asarray(values[ids], dtype=np.float32))
        return features


def file_problems(index_dir: Path, manifest: Mapping[str, Any], *, hash_limit: int | None) -> list[str]:
    """What is wrong with the files a (checked) manifest lists: missing, another size than
    recorded, or (for files up to ``hash_limit`` bytes; None: all) another sha256."""
    sizes = manifest.get("file_sizes") or {}
    problems = []
    for name, expected in manifest["files"].items():
        file = index_dir / name
        try:
            info = file.stat()
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{name}: not a regular file")
        elif name in sizes and info.st_size != sizes[name]:
            problems.append(f"{name}: {info.st_size:,} bytes, the manifest says {sizes[name]:,} (truncated or replaced)")
        elif (hash_limit is None or info.st_size <= hash_limit) and sha256_file(file) != expected:
            problems.append(f"{name}: checksum mismatch (modified or damaged)")
    return problems


def verify_index(index_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> list[str]:
    """Check checksums, counts and (optionally) a checkpoint; returns the problems found (empty: OK)."""
    path = Path(index_dir)
    try:
        manifest = read_manifest(path)
    except SearchIndexError as error:
        return [str(error)]
    problems = file_problems(path, manifest, hash_limit=None)
    if problems:
        return problems
    try:
        gallery = GalleryIndex.open(path, hash_limit=0)  # every file was hashed just above
    except SearchIndexError as error:
        problems.append(str(error))
        gallery = None
    if gallery is not None:
        roots = gallery.image_roots
        outside = [row["path"] for row in gallery.metadata if not is_inside(os.path.realpath(row["path"]), roots)]
        if outside:
            problems.append(
                f"{len(outside)} indexed images lie outside the index's image roots {[str(r) for r in roots]} "
                f"(e.g. {outside[0]!r}); tbps serve will not serve them"
            )
    if checkpoint is not None:
        try:
            method, config, info = _checkpoint_info(checkpoint, image_size=manifest.get("image_size"))
            dim = probe_feature_dim(method, info["image_size"])
            check_compatible(manifest, method, info["method"], info["checkpoint_sha256"], dim)
        except (IndexCompatibilityError, ValueError) as error:
            problems.append(str(error))
    else:
        from tbps.engine.checkpoint import recorded_model_problems

        # Hashed, never loaded: a swapped checkpoint is reported without unpickling it.
        problems.extend(recorded_model_problems(manifest))
    return problems


def add_images(
    index_dir: str | os.PathLike,
    sources: Sequence[ImageSource],
    *,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    on_batch: ProgressCallback | None = None,
    max_pixels: int | None = None,
    wait: float = 0.0,
) -> BuildReport:
    """Append images to an index without re-embedding the old ones (already indexed paths are skipped).

    ``max_pixels`` defaults to the index's own limit (``DEFAULT_MAX_PIXELS`` for older indexes);
    the new images' folders join the index's image roots.

    The updated index is written beside the old one and renamed into place, so a failed add
    leaves the old index untouched. The add holds the index's write lock from before it reads
    the index until the result is in place (``wait``: seconds to wait for another writer, see
    :func:`index_write_lock`), so two adds at once never lose each other's images.
    """
    index_dir = Path(index_dir)
    if index_dir.is_symlink():
        # Update the folder the link names (the link keeps naming it), under that folder's lock.
        index_dir = Path(os.path.realpath(index_dir))
    read_manifest(index_dir)  # "not a tbps index" before anything is created beside it
    with index_write_lock(index_dir, wait):
        started = time.perf_counter()
        _check_replaceable(index_dir, sources, ADD_HINT)
        gallery = GalleryIndex.open(index_dir)
        manifest = gallery.manifest
        max_pixels = check_max_pixels(max_pixels if max_pixels is not None else int(manifest.get("max_pixels", DEFAULT_MAX_PIXELS)))
        method, config, info = _checkpoint_info(checkpoint or manifest["checkpoint"], image_size=manifest.get("image_size"))
        check_compatible(manifest, method, info["method"], info["checkpoint_sha256"])
        method.to(device)
        known = {row["path"] for row in gallery.metadata}
        new_sources = [source for source in sources if str(source.path) not in known]
        report = BuildReport()
        report.skipped.extend(_scan_skipped(sources))
        report.skipped.extend({"path": str(s.path), "reason": "already indexed"} for s in sources if str(s.path) in known)
        if not new_sources:
            report.seconds = time.perf_counter() - started
            return report
        work_dir = _working_dir(index_dir, "adding")
        digest = _progress_digest(info["checkpoint_sha256"], new_sources, batch_size, max_pixels)
        _encode_into(method, image_transform(method, info["image_size"]), new_sources, work_dir, digest=digest,
                     batch_size=batch_size, num_workers=num_workers, resume=False, device=device, on_batch=on_batch,
                     max_pixels=max_pixels)
        features, metadata, skipped = _gather_batches(work_dir, new_sources)
        report.skipped.extend(skipped)
        report.indexed = len(metadata)
        if metadata:
            # FAISS appends to a trained index in place: the old vectors are never re-embedded.
            faiss_index = gallery.faiss_index
            faiss_index.add(np.ascontiguousarray(features["global"], dtype=np.float32))
            merged = {"global": np.concatenate([np.asarray(gallery.vectors), features["global"]])}
            for key, values in gallery.local.items():
                merged[key] = np.concatenate([np.asarray(values), features[key]])
            report.seconds = time.perf_counter() - started
            old_roots = [str(root) for root in gallery.image_roots]
            updated = {**manifest, "updated": datetime.now().astimezone().isoformat(timespec="seconds"),
                       "image_roots": _source_roots(new_sources, old_roots), "max_pixels": max_pixels,
                       "last_add_report": report.to_dict()}
            final_dir = _working_dir(index_dir, "final")
            shutil.rmtree(final_dir, ignore_errors=True)
            rows = gallery.metadata + metadata
            del gallery  # drop the memory maps before the files are replaced
            _write_index_files(final_dir, merged, rows, faiss_index, updated)
            _swap_into_place(final_dir, index_dir, sources, ADD_HINT)
        shutil.rmtree(work_dir, ignore_errors=True)
        report.seconds = time.perf_counter() - started
        return report


def manifest_rows(index_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The metadata rows of an index, in id order (:class:`SearchIndexError` if damaged)."""
    path = Path(index_dir) / METADATA
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchIndexError(f"index {str(index_dir)!r} is incomplete: no {METADATA}; rebuild it") from None
    except ValueError as error:
        raise SearchIndexError(f"{str(path)!r} is damaged: {error}; rebuild the index") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise SearchIndexError(f"{str(path)!r} is damaged: not a list of image entries; rebuild the index")
    return rows


def index_summary(index_dir: str | os.PathLike, gallery: GalleryIndex | None = None) -> dict[str, Any]:
    """What ``tbps index info`` prints: counts, method, FAISS settings, cameras, time range
    (of ``gallery``, an opened version of the index, when given)."""
    manifest = gallery.manifest if gallery is not None else read_manifest(index_dir)
    rows = gallery.metadata if gallery is not None else manifest_rows(index_dir)
    cameras = sorted({row["camera"] for row in rows if isinstance(row.get("camera"), str) and row["camera"]})
    times = sorted(row["timestamp"] for row in rows if isinstance(row.get("timestamp"), str) and row["timestamp"])
    size = sum(f.stat().st_size for f in Path(index_dir).iterdir() if f.is_file())
    return {
        "path": str(Path(index_dir).resolve()),
        "method": manifest["method"],
        "images": manifest["image_count"],
        "feature_dim": manifest["feature_dim"],
        "local_features": manifest["local_features"],
        "faiss": manifest["faiss"],
        "checkpoint": manifest["checkpoint"],
        "checkpoint_sha256": manifest["checkpoint_sha256"],
        "image_roots": manifest.get("image_roots"),
        "max_pixels": manifest.get("max_pixels"),
        # Descriptive keys: an index missing them is still usable, so they are not required.
        "created": manifest.get("created"),
        "updated": manifest.get("updated"),
        "skipped_at_build": (manifest.get("build_report") or {}).get("skipped_count"),
        "cameras": cameras,
        "time_range": [times[0], times[-1]] if times else None,
        "bytes_on_disk": size,
    }

