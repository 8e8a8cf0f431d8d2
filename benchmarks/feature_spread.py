"""Have a checkpoint's retrieval features collapsed? How far apart are different captions, and
different images, in the space the method ranks in?

For the first ``--samples`` training records (their image and first caption), each checkpoint's
``encode_image`` / ``encode_text`` features are read (eval mode) and, per feature (``global``,
``local``, ...), reported: the mean L2 norm, the mean cosine between *different* captions and
between *different* images (1.000: every input gives the same vector, the feature has collapsed),
and the mean cosine of matched (image, own caption) pairs against unmatched ones.

    PYTHONPATH=src python benchmarks/feature_spread.py CKPT [CKPT ...] [--samples 64] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tbps.data.readers import val_split_seed
from tbps.data.records import load_image
from tbps.engine.checkpoint import load_method
from tbps.engine.datamodule import load_configured_dataset
from tbps.search.index import image_transform
from tbps.utils import atomic_write
from tbps.utils.notices import quiet_library_notices


def mean_off_diagonal(similarity: torch.Tensor) -> float:
    size = similarity.shape[0]
    return float((similarity.sum() - similarity.diagonal().sum()) / (size * size - size))


def spread(checkpoint: Path, samples: int) -> dict[str, dict[str, float]]:
    method, config = load_method(checkpoint)
    method.eval()
    records = load_configured_dataset(config["data"], val_split_seed(config)).split("train")[:samples]
    transform = image_transform(method, config["data"]["image_size"])
    with torch.inference_mode():
        images = method.encode_image(torch.stack([transform(load_image(r.image_path)) for r in records]))
        texts = method.encode_text(method.build_text_processor()([r.captions[0] for r in records]))
    result = {}
    for name in sorted(set(images) & set(texts)):
        image, text = images[name].flatten(1).float(), texts[name].flatten(1).float()
        image_unit, text_unit = F.normalize(image, dim=1), F.normalize(text, dim=1)
        cross = text_unit @ image_unit.T
        result[name] = {
            "image_norm": float(image.norm(dim=1).mean()),
            "text_norm": float(text.norm(dim=1).mean()),
            "image_image_cosine": mean_off_diagonal(image_unit @ image_unit.T),
            "text_text_cosine": mean_off_diagonal(text_unit @ text_unit.T),
            "matched_cosine": float(cross.diagonal().mean()),
            "unmatched_cosine": mean_off_diagonal(cross),
        }
    return result


def main() -> None:
    quiet_library_notices()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--samples", type=int, default=64, help="training records read (their image and first caption)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    results = {}
    print("| checkpoint | feature | norm image / text | cos between different images | cos between different captions | cos matched / unmatched |")
    print("|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        results[str(checkpoint)] = spread(checkpoint, args.samples)
        for name, row in results[str(checkpoint)].items():
            print(f"| `{checkpoint}` | {name} | {row['image_norm']:.1f} / {row['text_norm']:.1f} | {row['image_image_cosine']:.3f} "
                  f"| {row['text_text_cosine']:.3f} | {row['matched_cosine']:.3f} / {row['unmatched_cosine']:.3f} |")
    if args.out is not None:
        with atomic_write(args.out) as handle:
            json.dump({"samples": args.samples, "checkpoints": results}, handle, indent=2)


if __name__ == "__main__":
    main()
