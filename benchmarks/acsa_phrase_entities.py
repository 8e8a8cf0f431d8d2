"""Which visual entity do ACSA's noun phrases attend to, by the body part they name?

For the first caption of each test image, paired with that image, every noun phrase that names
the garment of exactly one body part (keyword lists below, written for the synthetic benchmark's
captions; "a black jacket and black boots" names two and is skipped) is counted under the visual
entity of its largest alpha' (eq. 9). A table of shares per body part; chance is one entity in
five (four for relations I+II).

    PYTHONPATH=src python benchmarks/acsa_phrase_entities.py CHECKPOINT [--captions 400]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

from tbps.data.records import load_image
from tbps.engine.checkpoint import load_method
from tbps.data.readers import val_split_seed
from tbps.engine.datamodule import load_configured_dataset
from tbps.search.index import image_transform

BODY_PART_WORDS = {
    "head": ("hat", "cap", "hair", "head", "glasses", "helmet"),
    "upper body": ("jacket", "shirt", "coat", "sweater", "hoodie", "blouse", "vest"),
    "lower body": ("jeans", "pants", "trousers", "skirt", "shorts"),
    "feet": ("shoes", "boots", "sneakers", "sandals", "heels"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--captions", type=int, default=400, help="test captions to read (one per image)")
    args = parser.parse_args()

    method, config = load_method(args.checkpoint)
    if config["method"] != "acsa":
        raise SystemExit(f"{args.checkpoint} is a {config['method']} checkpoint; this reads ACSA's phrase attention")
    method.eval()
    data = config["data"]
    dataset = load_configured_dataset(data, val_split_seed(config))
    transform = image_transform(method, data["image_size"])
    processor = method.build_text_processor()
    counts = {part: collections.Counter() for part in BODY_PART_WORDS}
    entities: list[str] = []
    read = 0
    with torch.inference_mode():
        for record in dataset.split("test")[: args.captions]:
            result = method.explain_pair(transform(load_image(record.image_path)), record.captions[0], processor)
            entities = list(result["image_labels"])
            for phrase, entity in zip(result["text_labels"], result["attended"]):
                words = set(phrase.lower().replace(",", " ").split())
                parts = [part for part, keys in BODY_PART_WORDS.items() if words & set(keys)]
                if len(parts) == 1:
                    counts[parts[0]][entity] += 1
            read += 1
    print(f"{read} test captions; each row: phrases naming that body part's garment, and the share of them "
          f"attending most to each visual entity (chance {100 / max(len(entities), 1):.0f} %)\n")
    print("| phrase names | phrases | " + " | ".join(entities) + " |")
    print("|---|---|" + "---|" * len(entities))
    for part, counter in counts.items():
        total = sum(counter.values())
        print(f"| {part} | {total} | " + " | ".join(f"{100 * counter[e] / max(total, 1):.0f} %" for e in entities) + " |")


if __name__ == "__main__":
    main()
