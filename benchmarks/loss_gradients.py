"""Which of a method's losses drives which part of the model, at initialisation and after training?

For a checkpoint (``--fresh``: the same method built from the checkpoint's config with freshly
initialised new layers, i.e. the weights a run starts from), ``--batches`` training batches are drawn
as training draws them (the run's sampler, augmentation and batch size), the method's ``forward``
returns its named losses, and each loss's gradient is taken alone. Reported per loss, averaged
over the batches: its value, and the L2 norm of its gradient on each parameter group (the image
backbone, the text backbone, and everything else: the method's own layers and classifiers), and
the cosine between its gradient and the other losses' on the layers they share. A loss whose
gradient is a small share of the total on a group barely trains that group; two losses with a
negative cosine pull the shared layers apart.

    PYTHONPATH=src python benchmarks/loss_gradients.py CHECKPOINT [--fresh] [--batches 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from omegaconf import OmegaConf

from tbps.data.readers import val_split_seed
from tbps.engine.checkpoint import load_method, read_checkpoint
from tbps.engine.datamodule import PersonSearchDataModule, load_configured_dataset
from tbps.engine.train import build_module
from tbps.utils import atomic_write
from tbps.utils.notices import quiet_library_notices


def parameter_groups(method: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by where they sit: the two backbones (their attribute names are the
    core's convention) and the rest."""
    groups: dict[str, list[torch.nn.Parameter]] = {"image backbone": [], "text backbone": [], "method layers": []}
    for name, parameter in method.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("image_backbone."):
            groups["image backbone"].append(parameter)
        elif name.startswith("text_backbone."):
            groups["text backbone"].append(parameter)
        else:
            groups["method layers"].append(parameter)
    return {group: params for group, params in groups.items() if params}


def flat_gradient(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def main() -> None:
    quiet_library_notices()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--fresh", action="store_true", help="the checkpoint's config with freshly initialised weights")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--epoch", type=int, default=None, help="tell the method this epoch (schedules of losses); default: the checkpoint's")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()

    checkpoint = read_checkpoint(args.checkpoint)  # read once: its config, its epoch, its weights
    checkpoint_epoch = int(checkpoint.get("epoch", 0))
    config = checkpoint["tbps"]["config"]
    dataset = load_configured_dataset(config["data"], val_split_seed(config))
    seed = int(config.get("seed", 0))
    if args.fresh:
        # What train() starts from: the method built from the same config (pretrained backbones,
        # new layers initialised under the run's seed), its vocabulary fitted on the training captions.
        torch.manual_seed(seed)
        train_records = dataset.split("train")
        labels = {pid: i for i, pid in enumerate(sorted({r.person_id for r in train_records}))}
        method = build_module(config, labels).method
        method.fit_text([caption for record in train_records for caption in record.captions])
    else:
        method, config = load_method(args.checkpoint, checkpoint=checkpoint)
    epoch = checkpoint_epoch if args.epoch is None else args.epoch
    method.set_epoch(epoch)
    method.train()
    data = PersonSearchDataModule(OmegaConf.create(config["data"]), dataset, method.build_text_processor(),
                                  method.image_mean_std, seed=seed)
    groups = parameter_groups(method)
    totals: dict[str, dict[str, float]] = {}
    cosines: dict[str, float] = {}  # each loss's gradient against the sum of the others
    loader = iter(data.train_dataloader())
    for _ in range(args.batches):
        batch = next(loader)
        losses = method(batch)
        grads = {name: {group: flat_gradient(loss, params) for group, params in groups.items()} for name, loss in losses.items()}
        for name, loss in losses.items():
            entry = totals.setdefault(name, {"value": 0.0, **{group: 0.0 for group in groups}})
            entry["value"] += float(loss.detach()) / args.batches
            for group in groups:
                entry[group] += float(grads[name][group].norm()) / args.batches
            others = [other for other in losses if other != name]
            if others:
                shared = torch.cat([grads[name][group] for group in groups])
                rest = sum(torch.cat([grads[other][group] for group in groups]) for other in others)
                cosine = float(torch.nn.functional.cosine_similarity(shared, rest, dim=0, eps=1e-20))
                cosines[name] = cosines.get(name, 0.0) + cosine / args.batches
        del losses, grads
    print(f"{args.checkpoint} ({'fresh weights' if args.fresh else f'after epoch {checkpoint_epoch + 1}'}), {args.batches} training batches")
    header = ["loss", "value", *(f"|grad| {group}" for group in groups), "cos(grad, rest)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, entry in totals.items():
        cells = [name, f"{entry['value']:.3f}", *(f"{entry[group]:.3g}" for group in groups),
                 f"{cosines.get(name, float('nan')):.2f}"]
        print("| " + " | ".join(cells) + " |")
    if args.out is not None:
        with atomic_write(args.out) as handle:
            json.dump({"checkpoint": str(args.checkpoint), "fresh": args.fresh, "epoch": epoch, "batches": args.batches,
                       "losses": totals, "cosines": cosines}, handle, indent=2)


if __name__ == "__main__":
    main()
