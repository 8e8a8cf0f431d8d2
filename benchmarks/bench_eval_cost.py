"""NAFS and ACSA evaluation cost at CUHK-PEDES test size against the compute bound (issue 17 item 3).

Usage::

    PYTHONPATH=src python benchmarks/bench_eval_cost.py --out benchmarks/results/eval-cost.json
    PYTHONPATH=src python benchmarks/bench_eval_cost.py --device cuda --out /tmp/eval-cost-gpu.json

For each method, on features of the paper's shapes (random, seeded; a shared offset direction
makes the cosines mostly positive, as pretrained features are):

* **arithmetic**: multiply-adds of the cheapest exact formulation, summed over every (caption,
  image) pair with each caption's *valid* feature count n: NAFS ``2 m n D + m n^2 + n m^2``
  (cosine and value-product matrices; the two Gram quadratic forms), ACSA ``m n D + m n^2 +
  n m^2`` (see the section comment of the evaluation kernels in ``tbps/models/attention.py``);
* **bound**: those FLOPs (2 per multiply-add) at the measured rate of a plain float32 matmul of
  the kernel's GEMM shape (the gallery ``[3074 m, D]`` times a block of 512 text features),
  measured right before each timed segment (the machine is shared: the ratio compares numbers
  taken under the same load). Rates: ``torch.matmul`` (MKL here), oneDNN (what the kernel calls),
  oneDNN on ``workers`` threads of one intra-op thread each (how the kernel runs), bf16
  ``torch.matmul``; the bound uses the fastest float32 one;
* **kernel**: the evaluation kernel on the projected features, all captions, in ``--segments``
  ranges timed ``--repeats`` times each (medians of the times and of the rates measured just
  before each);
* **method**: ``method.similarity`` (global + local, the default ``test_similarity``) in chunks of
  256 captions, as ``tbps.evaluation.score_features`` calls it (projections included), and
  ``method.score_candidates`` on each caption's global top-128 (the two-stage route);
* **equality**: ``--check-rows`` captions (spread over the length distribution) against the
  full gallery with the differentiable reference implementation (``bidirectional_non_local_
  similarity`` / ``cross_attention_similarity``, what ``similarity`` computed before the kernels),
  at the method level too; the two-stage scores against the full scores on the kept candidates
  and against the reference candidate functions; and the kernel on bf16-rounded inputs, the error
  a bf16 GEMM would add at least.

Every timing records ``os.getloadavg()`` beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tbps.models.attention import (
    bidirectional_non_local_similarity,
    candidate_bidirectional_non_local_similarity,
    candidate_cross_attention_similarity,
    cross_attention_similarity,
    fast_bidirectional_non_local_similarity,
    fast_cross_attention_similarity,
)
from tbps.models.registry import create_method

CUHK_IMAGES, CUHK_CAPTIONS = 3074, 6156
TEXT_BLOCK = 512  # text features per GEMM in the matmul-rate measurement (the kernel's CPU tile width)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(result, seconds, load average) of one call."""
    sync(device)
    start = time.perf_counter()
    result = function()
    sync(device)
    return result, time.perf_counter() - start, load()


# ------------------------------------------------------------------------------ matmul rates


def _rate(function: Callable[[], Any], flops: float, device: torch.device, seconds: float) -> float:
    function()  # warm-up
    sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        function()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return flops * calls / elapsed / 1e9


def matmul_rates(rows: int, dim: int, device: torch.device, workers: int, seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of ``[rows, dim] @ [dim, TEXT_BLOCK]`` (the kernel's GEMM shape)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(rows, dim, generator=generator).to(device)
    right = torch.randn(TEXT_BLOCK, dim, generator=generator).to(device)
    flops = 2.0 * rows * dim * TEXT_BLOCK
    rates = {"load": load(), "threads": torch.get_num_threads()}
    rates["torch_matmul_fp32"] = _rate(lambda: left @ right.t(), flops, device, seconds)
    left16, right16 = left.bfloat16(), right.bfloat16()
    rates["torch_matmul_bf16"] = _rate(lambda: left16 @ right16.t(), flops, device, seconds)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
        rates["onednn_fp32"] = _rate(lambda: onednn(left, right), flops, device, seconds)
        if workers > 1:  # the kernel's way: each thread one intra-op thread, its own rows
            parts = left.chunk(workers)
            previous = torch.get_num_threads()

            def run_workers() -> None:
                def work(part: torch.Tensor) -> None:
                    torch.set_num_threads(1)
                    onednn(part, right)

                threads = [threading.Thread(target=work, args=(part,)) for part in parts]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()

            try:
                rates["onednn_fp32_workers"] = _rate(run_workers, flops, device, seconds)
            finally:
                torch.set_num_threads(previous)
    rates["best_fp32"] = max(value for key, value in rates.items() if key.endswith("fp32") or key.endswith("fp32_workers"))
    rates["load_after"] = load()
    return {key: round(value, 2) if isinstance(value, float) else value for key, value in rates.items()}


# ------------------------------------------------------------------------------ features


def caption_lengths(num_texts: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUHK-PEDES-like counts: word tokens (median 27, 8-98; captions average 23.5 words plus
    punctuation and word pieces), sub-sentences (1 + Poisson(2.5), at most 8), noun phrases
    (1 + Poisson(4.5), at most 10; 5.5 measured per caption on the synthetic benchmark)."""
    tokens = torch.exp(torch.randn(num_texts, generator=generator) * 0.3 + math.log(27.0)).round().clamp(8, 98).long()
    subs = (torch.poisson(torch.full((num_texts,), 2.5), generator=generator) + 1).clamp(max=8).long()
    phrases = (torch.poisson(torch.full((num_texts,), 4.5), generator=generator) + 1).clamp(max=10).long()
    return tokens, subs, phrases


def offset_features(generator: torch.Generator, common: torch.Tensor, *shape: int) -> torch.Tensor:
    dim = common.shape[0]
    return torch.randn(*shape, dim, generator=generator) / math.sqrt(dim) + 0.75 * common


def nafs_features(num_images: int, num_texts: int, dim: int, seed: int) -> tuple[dict, dict]:
    """NAFS's encode_image / encode_text layout: image ``local`` = global + 2 regions + 3 patches;
    text ``local`` = sentence, 8 sub-sentence slots, 100 word slots (slot 0 = [CLS], masked)."""
    generator = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(dim, generator=generator), dim=0)
    image_local = offset_features(generator, common, num_images, 6)
    tokens, subs, _ = caption_lengths(num_texts, generator)
    slots = torch.arange(108)
    mask = torch.cat(
        [
            torch.ones(num_texts, 1),
            (torch.arange(8) < subs.unsqueeze(1)).float(),
            ((slots[:100] >= 1) & (slots[:100] <= tokens.unsqueeze(1))).float(),
        ],
        dim=1,
    )
    text_local = offset_features(generator, common, num_texts, 109)
    text_local[:, 1:9] *= mask[:, 1:9].unsqueeze(-1)  # encode_text zeroes empty sub-sentence slots
    images = {"global": image_local[:, 0].clone(), "local": image_local}
    texts = {"global": text_local[:, 0].clone(), "local": text_local, "local_mask": mask}
    return texts, images


def acsa_features(num_images: int, num_texts: int, dim: int, seed: int) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(dim, generator=generator), dim=0)
    _, _, phrases = caption_lengths(num_texts, generator)
    mask = (torch.arange(10) < phrases.unsqueeze(1)).float()
    images = {"global": offset_features(generator, common, num_images), "regions": offset_features(generator, common, num_images, 4)}
    texts = {
        "global": offset_features(generator, common, num_texts),
        "phrases": offset_features(generator, common, num_texts, 10) * mask.unsqueeze(-1),
        "phrase_mask": mask,
    }
    return texts, images


def build(name: str, dim: int) -> Any:
    """The method's scoring path at paper dimensions; the backbones (tiny, random) are never run."""
    config: dict[str, Any] = {
        "embed_dim": dim,
        "max_text_length": 100,
        "image_backbone": {"name": "efficientnet_lite0", "pretrained": False},
        "text_backbone": {"name": "minilm", "pretrained": False},
    }
    if name == "nafs":
        config["max_sub_sentences"] = 8
    else:
        config["phrases"] = {"max_phrases": 10, "max_length": 16}
    torch.manual_seed(0)
    return create_method(name, config, num_classes=10, image_size=(64, 32)).eval()


def take(features: dict, rows: Any) -> dict:
    return {key: value[rows] for key, value in features.items()}


def to(features: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in features.items()}


def check_rows(counts: torch.Tensor, number: int) -> torch.Tensor:
    """``number`` captions spread over the length distribution (shortest to longest)."""
    order = torch.argsort(counts, stable=True)
    picks = torch.linspace(0, len(order) - 1, min(number, len(order))).round().long()
    return order[picks].sort().values


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def disagreement(fast: tuple, reference: tuple, float64: Callable[[int, int], tuple]) -> dict[str, Any]:
    """Pairs where the kernel and the reference (both float32, ``[images, rows]``) differ, and the
    worst one against a float64 computation ``float64(image, row)`` -> (S, S')."""
    diffs = torch.stack([(f.double() - r.double()).abs() for f, r in zip(fast, reference)])  # [2, images, rows]
    worst = diffs.amax(0)
    image, row = divmod(int(worst.argmax()), worst.shape[1])
    direction = int(diffs[:, image, row].argmax())
    exact = float(float64(image, row)[direction])
    return {
        "pairs": worst.numel(),
        "pairs_over_1e-5": int((worst > 1e-5).sum()),
        "pairs_over_1e-4": int((worst > 1e-4).sum()),
        "worst_pair": {
            "image": image, "row": row, "direction": ("image-to-text", "text-to-image")[direction],
            "kernel": float(fast[direction][image, row]), "reference": float(reference[direction][image, row]),
            "float64": exact,
        },
    }


# ------------------------------------------------------------------------------ per method


def pair_arithmetic(counts: torch.Tensor, num_images: int, m: int, dim: int, products: int) -> dict[str, float]:
    n = counts.double()
    gemm = products * m * n * dim
    quadratic = m * n.square() + n * m * m
    macs = float((gemm + quadratic).sum()) * num_images
    return {
        "pairs": int(len(counts) * num_images),
        "m": m,
        "D": dim,
        "mean_n": round(float(n.mean()), 2),
        "macs_per_pair_mean": round(float((gemm + quadratic).mean())),
        "gemm_share": round(float(gemm.sum() / (gemm + quadratic).sum()), 4),
        "macs_total": macs,
        "flops_total": 2 * macs,
    }


def run_kernel_segments(
    prepare: Callable[[slice], Any], score: Callable[[Any], tuple], num_texts: int, flops_of: Callable[[slice], float],
    segments: int, repeats: int, device: torch.device, rows: int, dim: int, workers: int,
) -> tuple[list[tuple], dict]:
    """Time ``score(prepare(part))`` over ``segments`` caption ranges (``prepare`` untimed),
    ``repeats`` times each, every timing right after a matmul-rate measurement; a segment's
    time and rates are the medians of its repeats."""
    results, records = [], []
    edges = [round(i * num_texts / segments) for i in range(segments + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        part = slice(start, stop)
        prepared = prepare(part)
        runs = []
        for _ in range(repeats):
            rates = matmul_rates(rows, dim, device, workers)
            result, seconds, load_after = timed(functools.partial(score, prepared), device)
            runs.append({"seconds": round(seconds, 3), "load_after": load_after, "rates": rates})
        del prepared
        flops = flops_of(part)
        seconds = statistics.median(run["seconds"] for run in runs)
        best = statistics.median(run["rates"]["best_fp32"] for run in runs)
        plain = statistics.median(run["rates"]["torch_matmul_fp32"] for run in runs)
        records.append({
            "texts": stop - start, "flops": flops, "seconds": seconds, "best_fp32": best, "torch_matmul_fp32": plain,
            "bound_seconds": round(flops / (best * 1e9), 3), "bound_seconds_torch_matmul": round(flops / (plain * 1e9), 3),
            "runs": runs,
        })
        results.append(result)
        print(
            f"  segment {start}-{stop}: {seconds:.2f} s (median of {repeats}; loads {[r['load_after'] for r in runs]}), "
            f"bound {records[-1]['bound_seconds']:.2f} s ({best:.0f} GFLOP/s)", flush=True,
        )
    total = sum(r["seconds"] for r in records)
    bound = sum(r["bound_seconds"] for r in records)
    bound_mkl = sum(r["bound_seconds_torch_matmul"] for r in records)
    summary = {
        "seconds": round(total, 2), "bound_seconds": round(bound, 2), "ratio": round(total / bound, 3),
        "bound_seconds_torch_matmul": round(bound_mkl, 2), "ratio_torch_matmul": round(total / bound_mkl, 3),
        "segments": records,
    }
    return results, summary


def method_similarity(method: Any, texts: dict, images: dict, chunk: int = 256) -> torch.Tensor:
    """``method.similarity`` in chunks of captions, as ``tbps.evaluation.score_features`` calls it."""
    num = next(iter(texts.values())).shape[0]
    return torch.cat([method.similarity(take(texts, slice(s, s + chunk)), images).float() for s in range(0, num, chunk)])


def method_candidates(method: Any, texts: dict, images: dict, candidates: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``method.score_candidates`` in chunks of captions, as ``two_stage_similarity`` calls it."""
    num = candidates.shape[0]
    return torch.cat([
        method.score_candidates(take(texts, slice(s, s + chunk)), images, candidates[s : s + chunk]).float()
        for s in range(0, num, chunk)
    ])


def bench_nafs(args: argparse.Namespace, device: torch.device, workers: int) -> dict[str, Any]:
    dim = 768
    method = build("nafs", dim).to(device)
    texts, images = nafs_features(args.images, args.texts, dim, args.seed)
    texts, images = to(texts, device), to(images, device)
    attention = method.attention
    counts = texts["local_mask"].sum(1).cpu()
    m = images["local"].shape[1]
    report: dict[str, Any] = {"arithmetic": pair_arithmetic(counts, args.images, m, dim, products=2)}
    print(f"NAFS: {report['arithmetic']}", flush=True)
    with torch.no_grad():
        options = dict(
            image_inverse_temperature=attention.image_inverse_temperature,
            text_inverse_temperature=attention.text_inverse_temperature,
            focal=attention.focal, lambda_scaling=attention.lambda_scaling,
        )
        mask = texts["local_mask"]
        projection_seconds = []

        def project(part: Any) -> tuple:
            # The gallery once per segment, the captions' valid features only (as similarity does).
            (projected), seconds, _ = timed(
                lambda: attention.project_for_evaluation(images["local"], texts["local"][part], mask[part]), device
            )
            projection_seconds.append(seconds)
            return projected, mask[part]

        def kernel(prepared: tuple):
            (queries, image_values, keys, text_values), part_mask = prepared
            return fast_bidirectional_non_local_similarity(
                queries, image_values, None, keys, text_values, part_mask, max_elements=method.similarity_max_elements, **options
            )

        def flops_of(part: slice) -> float:
            return pair_arithmetic(counts[part], args.images, m, dim, 2)["flops_total"]

        parts, report["kernel"] = run_kernel_segments(
            project, kernel, args.texts, flops_of, args.segments, args.repeats, device, args.images * m, dim, workers
        )
        report["projection"] = {"seconds": round(sum(projection_seconds), 2), "note": "gallery once per segment + valid caption features"}
        s_i2t = torch.cat([p[0] for p in parts], 1)
        s_t2i = torch.cat([p[1] for p in parts], 1)
        del parts
        print(f"  kernel {report['kernel']['seconds']} s = {report['kernel']['ratio']} x bound", flush=True)
        rows = check_rows(counts, args.check_rows).to(device)

        # bf16 inputs (the least error a bf16 GEMM adds).
        def rounded(x: torch.Tensor) -> torch.Tensor:
            return x.bfloat16().float()

        (queries, image_values, keys, text_values), _ = project(rows)
        b_i2t, b_t2i = fast_bidirectional_non_local_similarity(
            rounded(queries), rounded(image_values), None, rounded(keys), rounded(text_values), mask[rows], **options
        )
        report["bf16_inputs"] = {
            "max_abs_diff_i2t": max_diff(b_i2t, s_i2t[:, rows]), "max_abs_diff_t2i": max_diff(b_t2i, s_t2i[:, rows]),
        }
        print(f"  bf16 inputs: {report['bf16_inputs']}", flush=True)
        del queries, image_values, keys, text_values

        rates_before = matmul_rates(args.images * m, dim, device, workers)
        full, seconds, load_after = timed(lambda: method_similarity(method, texts, images), device)
        report["method"] = {"seconds": round(seconds, 2), "load_after": load_after, "rates_before": rates_before}
        report["method"]["ratio"] = round(seconds / (report["arithmetic"]["flops_total"] / (rates_before["best_fp32"] * 1e9)), 3)
        print(f"  method.similarity {seconds:.1f} s", flush=True)

        # Equality with the differentiable reference (what similarity computed before).
        reference_projection = attention.project(images["local"], texts["local"][rows])
        (ref_i2t, ref_t2i), seconds, load_after = timed(
            lambda: bidirectional_non_local_similarity(
                reference_projection[0], reference_projection[1], None, reference_projection[2], reference_projection[3],
                mask[rows],
                max_elements=method.similarity_max_elements, **options,
            ),
            device,
        )
        reference_score = F.normalize(texts["global"][rows], dim=-1) @ F.normalize(images["global"], dim=-1).t()
        reference_score = reference_score + ((ref_i2t + ref_t2i) / 2).t()
        report["reference"] = {
            "rows": len(rows), "seconds": round(seconds, 2), "load_after": load_after,
            "extrapolated_seconds": round(seconds * args.texts / len(rows), 1),
            "max_abs_diff_kernel_i2t": max_diff(s_i2t[:, rows], ref_i2t),
            "max_abs_diff_kernel_t2i": max_diff(s_t2i[:, rows], ref_t2i),
            "max_abs_diff_method": max_diff(full[rows], reference_score),
        }

        def nafs_float64(image: int, row: int) -> tuple:
            def project(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
                return F.linear(x.double(), layer.weight.double(), layer.bias.double())

            picture, caption = images["local"][image : image + 1], texts["local"][rows[row] : rows[row] + 1]
            return bidirectional_non_local_similarity(
                project(attention.image_query, picture), project(attention.image_value, picture), None,
                project(attention.text_key, caption), project(attention.text_value, caption), mask[rows[row] : rows[row] + 1].double(),
                **options,
            )

        report["reference"].update(disagreement((s_i2t[:, rows], s_t2i[:, rows]), (ref_i2t, ref_t2i), nafs_float64))
        print(f"  reference: {report['reference']}", flush=True)

        # Two-stage: global top-128, then the fine score on those.
        coarse = F.normalize(texts["global"], dim=-1) @ F.normalize(images["global"], dim=-1).t()
        candidates = coarse.topk(args.top_k, dim=1).indices
        picked, seconds, load_after = timed(lambda: method_candidates(method, texts, images, candidates), device)
        ref_candidates = candidate_bidirectional_non_local_similarity(
            reference_projection[0][candidates[rows]], reference_projection[1][candidates[rows]],
            reference_projection[2], reference_projection[3], mask[rows], **options,
        )
        ref_picked = coarse[rows].gather(1, candidates[rows]) + (ref_candidates[0] + ref_candidates[1]) / 2
        report["two_stage"] = {
            "top_k": args.top_k, "seconds": round(seconds, 2), "load_after": load_after,
            "max_abs_diff_to_full_on_candidates": max_diff(picked, full.gather(1, candidates)),
            "max_abs_diff_to_reference_candidates": max_diff(picked[rows], ref_picked),
        }
        print(f"  two-stage: {report['two_stage']}", flush=True)
    return report


def bench_acsa(args: argparse.Namespace, device: torch.device, workers: int) -> dict[str, Any]:
    dim = 768
    method = build("acsa", dim).to(device)
    texts, images = acsa_features(args.images, args.texts, dim, args.seed)
    texts, images = to(texts, device), to(images, device)
    visual = method.visual_entities(images)
    phrases, mask = method.text_entities(texts)
    counts = mask.sum(1).cpu()
    m = visual.shape[1]
    report: dict[str, Any] = {"arithmetic": pair_arithmetic(counts, args.images, m, dim, products=1)}
    print(f"ACSA: {report['arithmetic']}", flush=True)
    lambdas = (method.lambda_i2t, method.lambda_t2i)
    with torch.no_grad():
        def kernel(part: slice):
            return fast_cross_attention_similarity(visual, phrases[part], mask[part], *lambdas, max_elements=method.similarity_max_elements)

        def prepare(part: slice) -> slice:
            return part

        def flops_of(part: slice) -> float:
            return pair_arithmetic(counts[part], args.images, m, dim, 1)["flops_total"]

        parts, report["kernel"] = run_kernel_segments(
            prepare, kernel, args.texts, flops_of, args.segments, args.repeats, device, args.images * m, dim, workers
        )
        s_i2t = torch.cat([p[0] for p in parts], 1)
        s_t2i = torch.cat([p[1] for p in parts], 1)
        print(f"  kernel {report['kernel']['seconds']} s = {report['kernel']['ratio']} x bound", flush=True)

        rates_before = matmul_rates(args.images * m, dim, device, workers)
        full, seconds, load_after = timed(lambda: method_similarity(method, texts, images), device)
        report["method"] = {"seconds": round(seconds, 2), "load_after": load_after, "rates_before": rates_before}
        report["method"]["ratio"] = round(seconds / (report["arithmetic"]["flops_total"] / (rates_before["best_fp32"] * 1e9)), 3)
        print(f"  method.similarity {seconds:.1f} s", flush=True)

        rows = check_rows(counts, args.check_rows).to(device)
        (ref_i2t, ref_t2i), seconds, load_after = timed(
            lambda: cross_attention_similarity(visual, phrases[rows], mask[rows], *lambdas, max_elements=method.similarity_max_elements),
            device,
        )
        global_score = F.normalize(texts["global"], dim=-1) @ F.normalize(images["global"], dim=-1).t()
        reference_score = global_score[rows] + method.local_weight * ((ref_i2t + ref_t2i) / 2).t()
        report["reference"] = {
            "rows": len(rows), "seconds": round(seconds, 2), "load_after": load_after,
            "extrapolated_seconds": round(seconds * args.texts / len(rows), 1),
            "max_abs_diff_kernel_i2t": max_diff(s_i2t[:, rows], ref_i2t),
            "max_abs_diff_kernel_t2i": max_diff(s_t2i[:, rows], ref_t2i),
            "max_abs_diff_method": max_diff(full[rows], reference_score),
        }

        def acsa_float64(image: int, row: int) -> tuple:
            return cross_attention_similarity(
                visual[image : image + 1].double(), phrases[rows[row] : rows[row] + 1].double(), mask[rows[row] : rows[row] + 1].double(),
                *lambdas,
            )

        report["reference"].update(disagreement((s_i2t[:, rows], s_t2i[:, rows]), (ref_i2t, ref_t2i), acsa_float64))
        print(f"  reference: {report['reference']}", flush=True)

        candidates = global_score.topk(args.top_k, dim=1).indices
        picked, seconds, load_after = timed(lambda: method_candidates(method, texts, images, candidates), device)
        ref_candidates = candidate_cross_attention_similarity(visual[candidates[rows]], phrases[rows], mask[rows], *lambdas)
        ref_picked = global_score[rows].gather(1, candidates[rows]) + method.local_weight * (ref_candidates[0] + ref_candidates[1]) / 2
        report["two_stage"] = {
            "top_k": args.top_k, "seconds": round(seconds, 2), "load_after": load_after,
            "max_abs_diff_to_full_on_candidates": max_diff(picked, full.gather(1, candidates)),
            "max_abs_diff_to_reference_candidates": max_diff(picked[rows], ref_picked),
        }
        print(f"  two-stage: {report['two_stage']}", flush=True)

        b_i2t, b_t2i = fast_cross_attention_similarity(visual.bfloat16().float(), phrases[rows].bfloat16().float(), mask[rows], *lambdas)
        report["bf16_inputs"] = {
            "max_abs_diff_i2t": max_diff(b_i2t, s_i2t[:, rows]), "max_abs_diff_t2i": max_diff(b_t2i, s_t2i[:, rows]),
        }
        print(f"  bf16 inputs: {report['bf16_inputs']}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["nafs", "acsa"], choices=["nafs", "acsa"])
    parser.add_argument("--images", type=int, default=CUHK_IMAGES)
    parser.add_argument("--texts", type=int, default=CUHK_CAPTIONS)
    parser.add_argument("--segments", type=int, default=4, help="timed caption ranges, a matmul-rate measurement before each")
    parser.add_argument("--repeats", type=int, default=3, help="timings per segment (the median counts)")
    parser.add_argument("--check-rows", type=int, default=48, help="captions checked against the reference at full gallery size")
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the 1e-4 check)
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    result: dict[str, Any] = {
        "command": "PYTHONPATH=src python benchmarks/bench_eval_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items() if v is not None
        ),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "workers": workers,
            "torch": torch.__version__, "blas": "mkl" if torch.backends.mkl.is_available() else "other",
            "onednn": torch.backends.mkldnn.is_available(), "load_start": load(),
        },
        "methods": {},
    }
    for name in args.methods:
        result["methods"][name] = (bench_nafs if name == "nafs" else bench_acsa)(args, device, workers)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({name: {k: v for k, v in r.items() if k in ("kernel", "method")} for name, r in result["methods"].items()}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
