"""What CLIP ViT-B/16 costs on this machine: encoding speed, training step time, peak memory.

The ``clip`` method (CLIP + SDM + ID loss, ``configs/clip/*``) with both towers randomly
initialised in CLIP ViT-B/16's shapes (``pretrained: false``, no weights needed: speed does not
depend on the values), at 384x128 (24x8 patches + the class token = 193 tokens, IRRA's input):

* images/s: ``encode_image`` in eval mode without gradients, batches of ``--image-batch``;
* captions/s: ``encode_text`` likewise (tokenisation included), batches of ``--caption-batch``
  of CUHK-PEDES-like captions, padded to the batch's longest;
* training step: forward (both towers, SDM + ID), backward and an Adam step at
  ``--train-batch`` pairs, every parameter trained (IRRA fine-tunes all of CLIP);
* peak memory: the process's peak resident set size after each phase (monotone: each figure
  includes the phases before it; the model's own weights are counted from the start).

No CLIP tokenizer ships with tbps and nothing is downloaded, so a stand-in byte-level BPE
tokenizer in CLIP's format is written to a temporary folder, its merges learnt on the captions:
every word is one token, as CLIP's 49k-token BPE makes of most words in such captions (the text
model keeps CLIP's 49,408-row embedding table). The figures report the mean tokens
per caption. The first ``--warmup`` batches of each phase are not timed.

    python benchmarks/bench_clip.py --out benchmarks/results/clip-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tbps.models.registry import create_method
from tbps.utils import atomic_write

CAPTIONS = [
    "A woman with long black hair is wearing a white short sleeved shirt, a pair of blue jeans and white sneakers. She carries a brown bag on her right shoulder.",
    "The man has short hair and wears a dark grey jacket over a black shirt, black trousers and black leather shoes. He is holding a phone in his hand.",
    "A young girl in a pink dress with white flowers, white socks and red shoes. Her hair is tied in a ponytail and she has a yellow backpack.",
    "This person is wearing a red hooded sweatshirt, khaki shorts and grey running shoes, and is carrying a black umbrella in the left hand.",
    "An older man with grey hair wearing glasses, a light blue button down shirt, dark blue pants and brown shoes, walking with a newspaper.",
    "The woman wears a long beige coat, black tights and black boots. She has a white scarf around her neck and a black handbag on her arm.",
    "A man in a green t-shirt with a white logo on the front, black shorts and white sandals. He has a watch on his left wrist.",
    "She is wearing a black and white striped top, a short denim skirt and flat black shoes, with sunglasses on her head and a red purse.",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def write_stand_in_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer in CLIP's format (CLIP's normaliser, pre-tokeniser, ``</w>``
    word ends and special tokens) whose merges are learnt on the captions, so that each of their
    words is one token, as CLIP's own 49k-token BPE makes of most words in such captions."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    from tbps.models.backbones.clip import _bytes_to_unicode

    symbols = list(_bytes_to_unicode().values())
    base = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    raw = folder / "raw"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(base)}))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    backend = CLIPTokenizerFast.from_pretrained(str(raw), local_files_only=True).backend_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=5000, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CAPTIONS, trainer=trainer)
    backend.save(str(folder / "tokenizer.json"))
    CLIPTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")).save_pretrained(folder / "tokenizer")


def timed(function, batches: int, warmup: int) -> list[float]:
    times = []
    for index in range(warmup + batches):
        start = time.perf_counter()
        function()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 128))
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--caption-batch", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per phase")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    load_at_start = os.getloadavg()  # a shared machine's other work slows every figure below
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = tuple(args.image_size)

    with tempfile.TemporaryDirectory() as folder:
        write_stand_in_tokenizer(Path(folder))
        start = time.perf_counter()
        method = create_method(
            "clip",
            {"image_backbone": {"name": "clip", "pretrained": False},
             "text_backbone": {"name": "clip", "pretrained": False, "tokenizer": str(Path(folder) / "tokenizer")}},
            num_classes=11003,  # CUHK-PEDES's training identities (the ID classifier's size)
            image_size=size,
        )
        build_seconds = time.perf_counter() - start
        processor = method.build_text_processor()
    rss_built = peak_rss_mb()
    grid = method.image_backbone.feature_map_sizes(size)[0]

    captions = (CAPTIONS * (args.caption_batch // len(CAPTIONS) + 1))[: args.caption_batch]
    tokens = processor(captions)["attention_mask"].sum(dim=1).float()
    method.eval()
    images = torch.randn(args.image_batch, 3, *size)
    with torch.no_grad():
        image_times = timed(lambda: method.encode_image(images), args.batches, args.warmup)
        rss_images = peak_rss_mb()
        caption_times = timed(lambda: method.encode_text(processor(captions)), args.batches, args.warmup)
        rss_captions = peak_rss_mb()

    method.train()
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-5)
    pairs = (CAPTIONS * (args.train_batch // len(CAPTIONS) + 1))[: args.train_batch]
    batch = {"images": torch.randn(args.train_batch, 3, *size), "text": processor(pairs),
             "labels": torch.arange(args.train_batch) // 2}  # two captions per person

    def step() -> None:
        losses = method(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    train_times = timed(step, args.batches, args.warmup)
    rss_train = peak_rss_mb()

    result = {
        "what": "clip method, CLIP ViT-B/16 shapes, random init",
        "image_size": list(size),
        "final_feature_map": list(grid),
        "image_tokens": 1 + grid[0] * grid[1],
        "caption_tokens_mean": round(tokens.mean().item(), 1),
        "parameters_million": round(sum(p.numel() for p in method.parameters()) / 1e6, 1),
        "build_seconds": round(build_seconds, 1),
        "images_per_second": round(args.image_batch / statistics.median(image_times), 2),
        "image_batch": args.image_batch,
        "captions_per_second": round(args.caption_batch / statistics.median(caption_times), 2),
        "caption_batch": args.caption_batch,
        "train_step_seconds": round(statistics.median(train_times), 2),
        "train_batch": args.train_batch,
        "train_pairs_per_second": round(args.train_batch / statistics.median(train_times), 2),
        "peak_rss_mb": {"built": round(rss_built), "after_image_encoding": round(rss_images),
                        "after_caption_encoding": round(rss_captions), "after_training": round(rss_train)},
        "timed_batches": args.batches,
        "warmup_batches": args.warmup,
        "times_seconds": {"images": [round(t, 3) for t in image_times], "captions": [round(t, 3) for t in caption_times],
                          "train": [round(t, 3) for t in train_times]},
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in load_at_start],
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        with atomic_write(args.out) as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
