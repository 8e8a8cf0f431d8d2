"""Time tbps.evaluation.rank on CUHK-PEDES-sized and large random similarity matrices.

Usage::

    PYTHONPATH=src python benchmarks/bench_rank.py --sizes 6156x3074,20000x20000 --chunk-size 1024 --repeats 5

Id layout mimics a person search test split: about 3.07 images per person (CUHK-PEDES test: 3,074 images
of 1,000 persons, every person at least one image), the captions spread evenly over the images
(about 2 per image at CUHK size), and each caption carries its image's person id.  Scores are
standard-normal noise.  Peak memory is the process resident-set high-water mark (VmHWM) above
the resident set before the call, after resetting the high-water mark through /proc/self/clear_refs;
it covers torch allocations, which tracemalloc cannot see.  Prints one markdown table row per size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from tbps.evaluation import rank

IMAGES_PER_PERSON = 3074 / 1000  # CUHK-PEDES test split


def person_search_layout(
    num_captions: int, num_images: int, generator: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Caption ids and image ids: every person has >= 1 image, every image >= 1 caption when possible."""
    num_persons = max(1, round(num_images / IMAGES_PER_PERSON))
    extra_images = generator.integers(0, num_persons, size=num_images - num_persons)
    image_ids = np.sort(np.concatenate([np.arange(num_persons), extra_images]))
    per_image = num_captions // num_images
    leftover = generator.choice(num_images, num_captions - per_image * num_images)
    caption_images = np.concatenate([np.repeat(np.arange(num_images), per_image), leftover])
    return image_ids[np.sort(caption_images)], image_ids


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(
    sim: torch.Tensor, query_ids: np.ndarray, gallery_ids: np.ndarray, chunk_size: int
) -> tuple[float, float, dict]:
    """One timed call: (seconds, peak RSS above the starting RSS in MiB, result)."""
    reset = _reset_peak_rss()
    rss_before = _status_kib("VmRSS") if reset else _status_kib("VmHWM")
    start = time.perf_counter()
    result = rank(sim, query_ids, gallery_ids, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    peak_delta = max(0, _status_kib("VmHWM") - rss_before) / 1024
    return seconds, peak_delta, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="6156x3074,20000x20000", help="comma-separated QUERIESxGALLERY sizes")
    parser.add_argument("--chunk-size", type=int, default=1024, help="query rows per chunk passed to rank()")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs below 10^8 cells (median)")
    parser.add_argument("--large-repeats", type=int, default=1, help="timed runs for sizes of 10^8 cells or more")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, chunk_size {args.chunk_size}\n")
    print(
        "| queries x gallery | persons | matrix (MiB) | seconds (median of n) | n | peak RSS delta (MiB) "
        "| R1 / mAP (random) |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        num_queries, num_gallery = (int(part) for part in size.lower().split("x"))
        query_ids, gallery_ids = person_search_layout(num_queries, num_gallery, generator)
        sim = torch.randn(num_queries, num_gallery)
        repeats = args.repeats if num_queries * num_gallery < 10**8 else args.large_repeats
        runs = [measure(sim, query_ids, gallery_ids, args.chunk_size) for _ in range(max(1, repeats))]
        seconds = statistics.median(run[0] for run in runs)
        peak = max(run[1] for run in runs)
        result = runs[-1][2]
        matrix_mib = sim.numel() * sim.element_size() / 2**20
        print(
            f"| {num_queries:,} x {num_gallery:,} | {len(np.unique(gallery_ids)):,} | {matrix_mib:,.0f} | "
            f"{seconds:.2f} | {len(runs)} | {peak:,.0f} | {result['R1']:.2f} / {result['mAP']:.2f} |",
            flush=True,
        )
        del sim


if __name__ == "__main__":
    main()
