"""Which attributes does a checkpoint confuse? Its wrong top-1 results on the synthetic test split,
by how far the retrieved identity is from the query's and by the body part where they differ.

The synthetic benchmark (``tbps data synth``) writes each identity's attributes into the annotation
file and builds identities in families whose siblings differ in one or two attributes, so every
wrong top-1 can be read off exactly: the attributes in which the retrieved image's identity differs
from the query's. A global method that misses a small body part (headwear, glasses, shoes) should
show it here, and a local method that aligns that part should make fewer such errors.

For a colour attribute the script also says whether the caption could have told the two apart:
captions are written from the attributes and never contradict them, so when the query's colour
word is absent from the caption, the caption omits that attribute and the error is not the
model's (``unresolvable``).

    PYTHONPATH=src python benchmarks/error_attributes.py CKPT [CKPT ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from tbps.data.readers import val_split_seed
from tbps.data.datasets import build_queries
from tbps.data.synth import ANNOTATION_FILE, DESCRIBED_ATTRIBUTES, colour_words, tokenize
from tbps.engine.checkpoint import load_method
from tbps.engine.datamodule import load_configured_dataset
from tbps.evaluation.evaluator import evaluate_split
from tbps.utils import atomic_write
from tbps.utils.notices import quiet_library_notices

BODY_PART = {
    "gender": "gender",
    "hair_length": "head", "hair_colour": "head", "headwear": "head", "headwear_colour": "head", "glasses": "head",
    "upper_type": "upper body", "sleeve": "upper body", "upper_colour": "upper body", "upper_pattern": "upper body",
    "lower_type": "lower body", "lower_length": "lower body", "lower_colour": "lower body",
    "shoe_type": "feet", "shoe_colour": "feet",
    "carried": "carried", "carried_colour": "carried",
}
PARTS = ("gender", "head", "upper body", "lower body", "feet", "carried")
assert set(BODY_PART) == set(DESCRIBED_ATTRIBUTES), "every described attribute needs a body part"


def identity_attributes(annotation_file: Path) -> dict[int, dict]:
    """Person id -> described attributes, from a synthetic annotation file."""
    attributes: dict[int, dict] = {}
    for entry in json.loads(annotation_file.read_text()):
        if "attributes" not in entry:
            raise SystemExit(f"{annotation_file} has no 'attributes': this script reads synthetic data only")
        attributes[int(entry["id"])] = {key: entry["attributes"].get(key) for key in DESCRIBED_ATTRIBUTES}
    return attributes


def classify_errors(queries: list[tuple[int, str]], found: list[int], attributes: dict[int, dict]) -> dict:
    """Tally the wrong top-1 results: ``queries`` are (person id, caption), ``found`` the person id
    of each query's top-1 image, ``attributes`` each person's described attributes."""
    distance = Counter()
    attribute_errors = Counter()
    part_errors = Counter()
    unresolvable = 0
    for (person, caption), top1 in zip(queries, found, strict=True):
        if top1 == person:
            continue
        wanted, got = attributes[person], attributes[top1]
        differing = [key for key in DESCRIBED_ATTRIBUTES if wanted[key] != got[key]]
        distance[min(len(differing), 3)] += 1
        if len(differing) == 1:  # a sibling one attribute away: the error names exactly one part
            key = differing[0]
            attribute_errors[key] += 1
            part_errors[BODY_PART[key]] += 1
            colour = wanted[key]
            if key.endswith("_colour") and isinstance(colour, str) \
                    and set(tokenize(caption)).isdisjoint(colour_words(key, colour)):
                unresolvable += 1
    wrong = sum(distance.values())
    return {
        "queries": len(queries),
        "top1_wrong": wrong,
        "R1": 100.0 * (len(queries) - wrong) / len(queries),
        "wrong_by_distance": {("3+" if k == 3 else str(k)): distance[k] for k in (1, 2, 3)},
        "one_attribute_errors_by_part": {part: part_errors[part] for part in PARTS},
        "one_attribute_errors_by_attribute": dict(attribute_errors.most_common()),
        "one_attribute_colour_errors_the_caption_cannot_resolve": unresolvable,
    }


def analyse(checkpoint: Path) -> dict:
    """Rank the test split with the checkpoint's own test similarity and classify its errors."""
    method, config = load_method(checkpoint)
    data = config["data"]
    records = load_configured_dataset(data, val_split_seed(config)).split("test")
    attributes = identity_attributes(Path(data["root"]) / ANNOTATION_FILE)
    with torch.inference_mode():
        ranked = evaluate_split(method, records, data["image_size"], batch_size=int(data["eval_batch_size"]),
                                return_similarity=True)
    found = ranked["gallery_ids"][ranked["similarity"].argmax(dim=1)].tolist()
    return classify_errors([(q.person_id, q.caption) for q in build_queries(records)], found, attributes)


def main() -> None:
    quiet_library_notices()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    results = {str(checkpoint): analyse(checkpoint) for checkpoint in args.checkpoints}
    print("| checkpoint | R@1 | wrong top-1 | 1 / 2 / 3+ attributes away | one-attribute errors: "
          + " / ".join(PARTS) + " | of them, colour the caption omits |")
    print("|---|---|---|---|---|---|")
    for checkpoint, row in results.items():
        by_distance = " / ".join(str(v) for v in row["wrong_by_distance"].values())
        by_part = " / ".join(str(row["one_attribute_errors_by_part"][part]) for part in PARTS)
        print(f"| `{checkpoint}` | {row['R1']:.1f} | {row['top1_wrong']} | {by_distance} | {by_part} "
              f"| {row['one_attribute_colour_errors_the_caption_cannot_resolve']} |")
    if args.out is not None:
        with atomic_write(args.out) as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
