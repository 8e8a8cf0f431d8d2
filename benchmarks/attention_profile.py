"""Where does a method's attention fall on the image, and does it move with the text?

For the first caption of each of ``--captions`` test images, paired with its image, every row of
the method's attention figure (``method.visualize``: NAFS's sentence / sub-sentences / words,
ACSA's phrases, ISANet's RGL and topic centres, LAIP's phrases) is reduced to its vertical profile
(each map summed over its width, normalised to 1). Per row kind the script reports, over all its
maps:

* the vertical centre of mass (0 = top of the image, 1 = bottom), mean and standard deviation:
  an attention that follows the text moves as the phrases do (a hat high, shoes low), one that
  ignores the text sits in one place (small spread);
* the profile's entropy over the map's rows, normalised to [0, 1] (1 = uniform, 0 = one row):
  how selective it is;
* for maps labelled with a word or phrase naming the garment of exactly one body part (the
  keyword lists of ``acsa_phrase_entities.py`` plus "beanie" and "sunglasses"), the mean
  centre per body part: an attention that
  follows the text puts head < upper body < lower body < feet.

    PYTHONPATH=src python benchmarks/attention_profile.py CHECKPOINT [--captions 200] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from tbps.data.readers import val_split_seed
from tbps.data.records import load_image
from tbps.engine.checkpoint import load_method
from tbps.engine.datamodule import load_configured_dataset
from tbps.search.index import image_transform
from tbps.text.tokenizers import normalize_caption
from tbps.utils import atomic_write

from acsa_phrase_entities import BODY_PART_WORDS as GARMENT_WORDS  # noqa: E402 - this script's folder

# acsa_phrase_entities.py's garment words, plus two head words of the synthetic captions (NAFS's
# word maps see each word alone, so "beanie" and "sunglasses" need their own entries).
BODY_PART_WORDS = {**GARMENT_WORDS, "head": (*GARMENT_WORDS["head"], "beanie", "sunglasses")}


def body_part(label: str) -> str | None:
    """The one body part whose garment ``label`` names, else ``None``."""
    words = set(label.lower().replace(",", " ").replace(".", " ").split())
    parts = [part for part, keys in BODY_PART_WORDS.items() if words & set(keys)]
    return parts[0] if len(parts) == 1 else None


def vertical_profile(attention_map: torch.Tensor) -> torch.Tensor | None:
    """The map's mass per row, summing to 1 (``None`` for an all-zero map)."""
    profile = torch.as_tensor(attention_map, dtype=torch.float64).clamp(min=0).sum(-1)
    total = profile.sum()
    return None if total <= 0 else profile / total


def describe(profile: torch.Tensor) -> tuple[float, float]:
    """(centre of mass in [0, 1] from the top, entropy normalised by log(rows))."""
    rows = profile.shape[0]
    positions = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    centre = float((profile * positions).sum())
    entropy = -float((profile * profile.clamp(min=1e-30).log()).sum())
    return centre, entropy / math.log(rows) if rows > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--captions", type=int, default=200, help="test images read (the first caption of each)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()

    method, config = load_method(args.checkpoint)
    method.eval()
    data = config["data"]
    dataset = load_configured_dataset(data, val_split_seed(config))
    transform = image_transform(method, data["image_size"])
    stats: dict[str, dict[str, list[float]]] = {}
    read = 0
    with torch.inference_mode():
        for record in dataset.split("test")[: args.captions]:
            rows = method.visualize(transform(load_image(record.image_path)), normalize_caption(record.captions[0]))
            if not rows:
                raise SystemExit(f"{config['method']} has no attention of its own to profile")
            for kind, (labels, maps) in rows.items():
                for label, attention_map in zip(labels, maps):
                    profile = vertical_profile(attention_map)
                    if profile is None:
                        continue
                    centre, entropy = describe(profile)
                    entry = stats.setdefault(kind, {"centre": [], "entropy": []})
                    entry["centre"].append(centre)
                    entry["entropy"].append(entropy)
                    part = body_part(str(label))
                    if part is not None:
                        entry.setdefault(part, []).append(centre)
            read += 1

    summary = {
        kind: {
            "maps": len(values["centre"]),
            "centre_mean": statistics.fmean(values["centre"]),
            "centre_sd": statistics.pstdev(values["centre"]),
            "entropy_mean": statistics.fmean(values["entropy"]),
            "centre_by_body_part": {part: {"maps": len(values[part]), "centre_mean": statistics.fmean(values[part])}
                                    for part in BODY_PART_WORDS if values.get(part)},
        }
        for kind, values in stats.items()
    }
    print(f"{config['method']}, {args.checkpoint}: {read} test images, the first caption of each\n")
    print("| attention | maps | vertical centre (0 top, 1 bottom), mean ± sd | entropy of the vertical profile (1 = uniform) "
          "| mean centre of the maps naming: " + " / ".join(BODY_PART_WORDS) + " (maps) |")
    print("|---|---|---|---|---|")
    for kind, row in summary.items():
        parts = row["centre_by_body_part"]
        by_part = " / ".join(f"{parts[p]['centre_mean']:.2f} ({parts[p]['maps']})" if p in parts else "–" for p in BODY_PART_WORDS)
        print(f"| {kind} | {row['maps']} | {row['centre_mean']:.2f} ± {row['centre_sd']:.2f} | {row['entropy_mean']:.2f} | {by_part} |")
    if args.out is not None:
        with atomic_write(args.out) as handle:
            json.dump({"checkpoint": str(args.checkpoint), "method": config["method"], "images": read,
                       "rows": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
