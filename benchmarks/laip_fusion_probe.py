"""How much of the caption does LAIP's fusion encoder carry, and how well does ITM separate pairs?

Takes N test images (one every 4th, so they are mostly different identities) and the first
caption of each, then prints:

* the mean pairwise cosine of the text encoder's [CLS] over the N captions;
* the mean pairwise cosine of the fusion [CLS] (and of the mean of the fused tokens) for one
  image fused with N different captions, and for one caption fused with N different images:
  near 1 across captions means the fused vector barely depends on the caption;
* ITM's p(match) on the N matching pairs against the N × (N − 1) others.

    PYTHONPATH=src python benchmarks/laip_fusion_probe.py CHECKPOINT [--pairs 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from tbps.data.records import load_image
from tbps.engine.checkpoint import load_method
from tbps.data.readers import val_split_seed
from tbps.engine.datamodule import load_configured_dataset
from tbps.models.base import pool_tokens
from tbps.search.index import image_transform


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    unit = F.normalize(vectors.float(), dim=-1)
    count = len(unit)
    return float(((unit @ unit.t()).sum() - count) / (count * count - count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args()
    method, config = load_method(args.checkpoint)
    if config["method"] != "laip":
        raise SystemExit(f"{args.checkpoint} is a {config['method']} checkpoint; this probes LAIP's fusion encoder")
    method.eval()
    data = config["data"]
    dataset = load_configured_dataset(data, val_split_seed(config))
    records = dataset.split("test")[: 4 * args.pairs : 4]
    count = len(records)
    if count < 2:
        raise SystemExit("the test split needs at least 2 images (every 4th is used)")
    transform = image_transform(method, data["image_size"])
    with torch.inference_mode():
        images = method.encode_image(torch.stack([transform(load_image(r.image_path)) for r in records]))["tokens"]
        text = method.encode_text(method.build_text_processor()([r.captions[0] for r in records]))
        tokens, mask = text["tokens"], text["mask"]
        one_image, _ = method.fuse(tokens, mask, images[:1].expand(count, -1, -1))
        one_caption, _ = method.fuse(tokens[:1].expand(count, -1, -1), mask[:1].expand(count, -1), images)
        match = torch.stack(
            [method.itm_logits(tokens, mask, images[j : j + 1].expand(count, -1, -1)).softmax(-1)[:, 1] for j in range(count)], dim=1
        )
    print(f"{count} test captions x {count} test images")
    print(f"text encoder [CLS] across captions: {mean_pairwise_cosine(tokens[:, 0]):.3f}")
    print(f"fusion [CLS], one image x {count} captions: {mean_pairwise_cosine(one_image[:, 0]):.3f}; "
          f"one caption x {count} images: {mean_pairwise_cosine(one_caption[:, 0]):.3f}")
    print(f"mean of fused tokens, one image x {count} captions: {mean_pairwise_cosine(pool_tokens(one_image, mask, 'mean')):.3f}; "
          f"one caption x {count} images: {mean_pairwise_cosine(pool_tokens(one_caption, mask[:1].expand(count, -1), 'mean')):.3f}")
    off_diagonal = (match.sum() - match.diag().sum()) / (count * count - count)
    print(f"ITM p(match): matching pairs {match.diag().mean():.3f}, the others {off_diagonal:.3f}")


if __name__ == "__main__":
    main()
