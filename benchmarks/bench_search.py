"""Search benchmarks: query latency at scale (exact vs approximate) and index build throughput.

    python benchmarks/bench_search.py latency --sizes 10000 100000 1000000 --queries 200
    python benchmarks/bench_search.py build --checkpoint CKPT --images DIR [--limit 512]

``latency``: random unit vectors of the baseline's size (256-d) stand in for gallery embeddings
(search cost depends on the count and size, not the values). For each size: one query at a time
(the service's pattern), p50 / p95 latency of IndexFlatIP (exact), IVF-Flat and HNSW, recall@10
of the approximate indexes against the exact one, and the exact scan's memory-bandwidth bound:
an exact scan must read n x d x 4 bytes per query, so latency >= bytes / bandwidth, with the
bandwidth measured here by a large numpy copy.

``build``: images per second of the batched index builder vs a plain one-image-at-a-time
loop, and where one-at-a-time time goes (decode, transform, model).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Sustained read+write bandwidth of a large copy, bytes / second (best of ``repeats``)."""
    source = np.ones(megabytes * 1024 * 1024 // 8, dtype=np.float64)
    target = np.empty_like(source)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best  # the copy reads and writes every byte


def random_unit(count: int, dim: int, seed: int, latent_dim: int | None = None) -> np.ndarray:
    """Random unit vectors; with ``latent_dim``, a random linear image of a ``latent_dim``-d
    Gaussian plus 10% isotropic noise. Learned embeddings have a low intrinsic dimension;
    uniform vectors in 256-d have no neighbourhood structure at all (every point is nearly
    orthogonal to every other), which makes any approximate index look useless."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(12345).standard_normal((latent_dim, dim), dtype=np.float32) if latent_dim else None
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):  # chunked so 1M x 256 never needs a float64 copy
        rows = min(100_000, count - start)
        if mixing is None:
            block = rng.standard_normal((rows, dim), dtype=np.float32)
        else:
            block = rng.standard_normal((rows, latent_dim), dtype=np.float32) @ mixing
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            block += 0.1 * rng.standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def time_queries(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query latencies (seconds) and result ids, one query per call."""
    latencies = np.empty(len(queries))
    ids = np.empty((len(queries), k), dtype=np.int64)
    index.search(queries[:1], k)  # warm-up
    for i, query in enumerate(queries):
        started = time.perf_counter()
        _, found = index.search(query.reshape(1, -1), k)
        latencies[i] = time.perf_counter() - started
        ids[i] = found[0]
    return latencies, ids


def latency(args: argparse.Namespace) -> list[dict]:
    from tbps.search.index import make_faiss_index

    bandwidth = measure_bandwidth()
    print(f"measured memory bandwidth: {bandwidth / 1e9:.1f} GB/s (numpy copy); faiss threads: {faiss.omp_get_max_threads()}")
    rows = []
    for size in args.sizes:
        gallery = random_unit(size, args.dim, seed=size, latent_dim=args.latent_dim or None)
        # Queries from the same distribution as the gallery (not copies of gallery items).
        queries = random_unit(args.queries, args.dim, seed=1, latent_dim=args.latent_dim or None)
        truth = None
        for kind in args.kinds:
            started = time.perf_counter()
            index, params = make_faiss_index(gallery, kind)
            build_s = time.perf_counter() - started
            # IVF: the default nprobe and a sweep, on the same trained index.
            settings = [params.get("nprobe")] + [n for n in args.nprobes if n < params.get("nlist", 0) and n != params.get("nprobe")] if "nprobe" in params else [None]
            for nprobe in settings:
                if nprobe is not None:
                    faiss.extract_index_ivf(index).nprobe = nprobe
                if "ef_search" in params:
                    index.hnsw.efSearch = params["ef_search"]
                latencies, ids = time_queries(index, queries, 10)
                if kind == "flat":
                    truth = ids
                recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, ids)])) if truth is not None else float("nan")
                p50, p95 = np.percentile(latencies, [50, 95]) * 1000
                shown = {k: v for k, v in params.items() if k != "kind"}
                if nprobe is not None:
                    shown["nprobe"] = nprobe
                row = {"images": size, "index": kind, "params": shown, "build_s": round(build_s, 2),
                       "p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "recall@10": round(recall, 4)}
                if kind == "flat":
                    bound_ms = size * args.dim * 4 / bandwidth * 1000
                    row["bandwidth_bound_ms"] = round(bound_ms, 3)
                    row["p50_over_bound"] = round(p50 / bound_ms, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del index
        del gallery
    return rows


def build(args: argparse.Namespace) -> list[dict]:
    import torch

    from tbps.data.records import load_image
    from tbps.engine.checkpoint import load_method
    from tbps.search.index import build_index, image_transform, scan_folder

    sources = scan_folder(args.images)[: args.limit]
    method, config = load_method(args.checkpoint)
    transform = image_transform(method, config["data"]["image_size"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            started = time.perf_counter()
            build_index(args.checkpoint, sources, Path(tmp) / f"index{workers}", batch_size=args.batch_size, num_workers=workers)
            seconds = time.perf_counter() - started
            rows.append({"mode": f"batched (batch {args.batch_size}, {workers} workers, incl. model load + FAISS)",
                         "images": len(sources), "seconds": round(seconds, 2), "images_per_s": round(len(sources) / seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    # One image at a time: decode, transform and model timed separately.
    decode = transform_s = model_s = 0.0
    with torch.no_grad():
        for source in sources:
            t0 = time.perf_counter()
            picture = load_image(source.path)
            t1 = time.perf_counter()
            tensor = transform(picture).unsqueeze(0)
            t2 = time.perf_counter()
            method.encode_image(tensor)
            t3 = time.perf_counter()
            decode, transform_s, model_s = decode + t1 - t0, transform_s + t2 - t1, model_s + t3 - t2
    total = decode + transform_s + model_s
    rows.append({"mode": "one at a time", "images": len(sources), "seconds": round(total, 2), "images_per_s": round(len(sources) / total, 1),
                 "decode_%": round(100 * decode / total, 1), "transform_%": round(100 * transform_s / total, 1), "model_%": round(100 * model_s / total, 1)})
    print(json.dumps(rows[-1]), flush=True)
    # The batched path's split: same stages, batch of batch_size through the model.
    with torch.no_grad():
        pictures, tensors = [], []
        t0 = time.perf_counter()
        pictures = [load_image(s.path) for s in sources]
        t1 = time.perf_counter()
        tensors = [transform(p) for p in pictures]
        t2 = time.perf_counter()
        for start in range(0, len(tensors), args.batch_size):
            method.encode_image(torch.stack(tensors[start : start + args.batch_size]))
        t3 = time.perf_counter()
    total = t3 - t0
    rows.append({"mode": f"batched stages only (batch {args.batch_size}, no workers)", "images": len(sources), "seconds": round(total, 2),
                 "images_per_s": round(len(sources) / total, 1), "decode_%": round(100 * (t1 - t0) / total, 1),
                 "transform_%": round(100 * (t2 - t1) / total, 1), "model_%": round(100 * (t3 - t2) / total, 1)})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    lat.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"])
    lat.add_argument("--dim", type=int, default=256)
    lat.add_argument("--queries", type=int, default=200)
    lat.add_argument("--nprobes", type=int, nargs="+", default=[8, 128], help="extra IVF nprobe values to time")
    lat.add_argument("--latent-dim", type=int, default=32, help="intrinsic dimension of the random embeddings (0: uniform in 256-d)")
    bld = sub.add_parser("build")
    bld.add_argument("--checkpoint", required=True)
    bld.add_argument("--images", required=True)
    bld.add_argument("--limit", type=int, default=512)
    bld.add_argument("--batch-size", type=int, default=64)
    bld.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    rows = latency(args) if args.task == "latency" else build(args)
    if args.json:
        from tbps.utils import atomic_write

        with atomic_write(args.json) as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
