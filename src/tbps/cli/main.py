"""The ``tbps`` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tbps.cli.data import app as data_app
from tbps.cli.search import index_app, search_command, serve_command
from tbps.utils.notices import quiet_library_notices

app = typer.Typer(help="tbps: text-based person search — train, evaluate and search galleries by description.", no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data")
app.add_typer(index_app, name="index")
app.command("search")(search_command)
app.command("serve")(serve_command)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _every_command() -> None:
    quiet_library_notices()

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError, OSError)


def fail(message: str, code: int = 2) -> None:
    # Text, not markup: a path or caption holding "[/]" would otherwise crash rich (issue 15 item 11).
    err_console.print(Text.assemble(("error:", "bold red"), " ", message))
    raise typer.Exit(code)


def metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    table = Table(title=Text(title))  # titles name datasets and paths: never parsed as markup
    table.add_column("")
    for key in ("R@1", "R@5", "R@10", "mAP", "mINP"):
        table.add_column(key, justify="right")
    for label, metrics in rows.items():
        table.add_row(label, *(f"{metrics[k]:.2f}" for k in ("R1", "R5", "R10", "mAP", "mINP")))
    return table


@app.command("methods")
def methods_command() -> None:
    """List the registered methods."""
    from tbps.models.registry import list_methods

    for name, description in list_methods().items():
        console.print(f"[bold]{name}[/]  {description}")


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train_command(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML path or method/dataset name under configs/ (default: baseline/synthetic; with --resume: the checkpoint's config)"),
    resume: Optional[Path] = typer.Option(None, help="run directory or checkpoint to continue exactly; overrides may then change only trainer.max_epochs, trainer.progress_bar, trainer.log_every_n_steps, data.num_workers, data.eval_batch_size, data.check_images"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value config overrides, e.g. optim.lr=3e-4"),
) -> None:
    """Train a method; the resolved config is saved beside the run and inside every checkpoint.

    Before training, every split, identity count, batch, image (data.check_images: exists |
    decode) and data.image_size is checked; a failure names the setting to change.
    """
    from tbps.config import load_config
    from tbps.engine.train import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if resume is not None and config is None:
            # The checkpoint's own config, changed only by the overrides a resume allows.
            result = train(None, resume=resume, overrides=overrides or [])
        else:
            cfg = load_config(config or "baseline/synthetic", overrides or [])
            result = train(cfg, resume=resume)
    except USER_ERRORS as error:
        fail(str(error))
    rows = {
        f"{tag} (epoch {entry['epoch']})": entry["test"] for tag, entry in result.report.get("checkpoints", {}).items()
    }
    if rows:
        selected = "selected on val" if result.report.get("selection", "").startswith("best") else "no val split: the last checkpoint is the result"
        console.print(metrics_table(f"test split ({selected})", rows))
    console.print(Text(f"run directory: {result.run_dir}"))


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="a tbps checkpoint (.ckpt), or CLIP weights evaluated zero-shot (a Hugging Face CLIP folder or OpenAI's ViT-B-16.pt; give --dataset and --root)"),
    split: str = typer.Option("test", help="test, val, or train (how well the model fits the identities it was trained on: a diagnostic, never a result)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write metrics and per-query ranks to this JSON file"),
    rerank: Optional[str] = typer.Option(None, help="none | two-stage | rvn | two-stage+rvn (default: the checkpoint config's eval.rerank)"),
    top_k: Optional[int] = typer.Option(None, help="candidates kept by two-stage scoring (default: eval.top_k)"),
    dataset: Optional[str] = typer.Option(None, help="override the dataset stored in the checkpoint"),
    root: Optional[Path] = typer.Option(None, help="override the dataset root stored in the checkpoint"),
    image_to_text: bool = typer.Option(False, "--i2t", help="also report the image-to-text direction (always on the plain similarity: re-ranked scores are per text query)"),
    batch_size: int = typer.Option(128),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="CLIP models only: a template every caption is put into, with {} exactly once, e.g. 'a photo of {}'"),
) -> None:
    """Evaluate a checkpoint on a split: R@1/5/10, mAP, mINP (text-to-image, identity-level)."""
    import torch

    from tbps.data.readers import load_dataset, val_split_seed
    from tbps.engine.checkpoint import load_model_source
    from tbps.evaluation.evaluator import evaluate_split, scoring_options
    from tbps.utils import atomic_write

    if split not in ("test", "val", "train"):
        fail(f"--split must be test, val or train, got {split!r}")
    run_device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        method, config = load_model_source(checkpoint, prompt, map_location=run_device)
        data = config["data"]
        if (dataset or data.get("dataset")) is None or (root or data.get("root")) is None:
            fail(f"{checkpoint} holds CLIP weights, which name no dataset: pass --dataset NAME --root DIR")
        # The val split the run was selected on: carved with its data.val_split_seed, not its seed.
        ds = load_dataset(dataset or data["dataset"], root or data["root"], val_identity_fraction=float(data.get("val_identity_fraction", 0.1)), seed=val_split_seed(config))
        records = ds.split(split)
        scoring = scoring_options(config)
        rerank = rerank if rerank is not None else scoring["rerank"]
        top_k = top_k if top_k is not None else scoring["top_k"]
        result = evaluate_split(
            method, records, data["image_size"], batch_size=batch_size, rerank=rerank, top_k=top_k,
            rvn_neighbours=scoring["rvn_neighbours"],
            device=run_device, progress=sys.stderr.isatty(), image_to_text=image_to_text,
        )
    except USER_ERRORS as error:
        fail(str(error))
    metrics = {key: result[key] for key in ("R1", "R5", "R10", "mAP", "mINP")}
    rows = {"text-to-image": metrics}
    if image_to_text:
        rows["image-to-text"] = {key: result["i2t"][key] for key in metrics}
    console.print(metrics_table(f"{config['method']} on {ds.name} {split} ({len(records)} images, {len(result['query_ids'])} queries)", rows))
    if json_out is not None:
        per_query = result["per_query"]
        payload: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "method": config["method"],
            **({"zero_shot": True, "prompt": config["model"].get("prompt")} if config.get("zero_shot") else {}),
            "dataset": ds.name,
            "split": split,
            "rerank": rerank,
            "metrics": rows,
            **({"image_to_text_scoring": "none (the plain similarity; re-ranking is per text query)"} if image_to_text else {}),
            "num_queries": result["num_queries"],
            "num_excluded": result["num_excluded"],
            "per_query": [
                {
                    "query": i,
                    "person_id": int(result["query_ids"][i]),
                    "first_hit_rank": int(per_query["first_hit_rank"][i]),
                    "average_precision": float(per_query["average_precision"][i]),
                    "top10": [int(j) for j in per_query["top_indices"][i]],
                }
                for i in range(len(result["query_ids"]))
            ],
            "gallery": [str(r.relative_path or r.image_path) for r in records],
        }
        with atomic_write(json_out) as handle:
            json.dump(payload, handle)
        console.print(Text(f"wrote {json_out}"))


@app.command("explain")
def explain_command(
    image: Path = typer.Argument(..., help="a person image (JPEG, PNG, ...)"),
    caption: str = typer.Argument(..., help="the description whose attention to draw"),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="a tbps checkpoint (.ckpt), or CLIP weights (a Hugging Face CLIP folder or OpenAI's ViT-B-16.pt)"),
    out: Path = typer.Option(Path("attention.png"), "--out", "-o", help="the figure to write (PNG)"),
    device: str = typer.Option("cpu", help="auto, cpu or cuda"),
) -> None:
    """Draw the method's attention for one image and caption as a PNG figure.

    NAFS: the image stripes the sentence, each sub-sentence and each word attend to (Fig. 4);
    ACSA: the visual entity of each noun phrase; ISANet: the RGL attention and the topic centres;
    LAIP: forward vs bidirectional attention per noun phrase (Fig. 7). Methods without an
    attention of their own (the baseline) get the generic occlusion relevance.
    """
    import numpy as np
    import torch

    from tbps.data.records import load_image
    from tbps.engine.checkpoint import load_model_source
    from tbps.search.index import image_transform
    from tbps.search.searcher import occlusion_relevance, render_attention_figure
    from tbps.text.phrases import NounPhraseExtractor
    from tbps.text.tokenizers import normalize_caption
    from tbps.utils import atomic_write_bytes

    run_device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        text = normalize_caption(caption)
        picture = load_image(image)
        method, config = load_model_source(checkpoint, map_location=run_device)
        tensor = image_transform(method, config["data"]["image_size"])(picture).to(run_device)
        rows = method.visualize(tensor, text)
        if not rows or not any(len(labels) for labels, _ in rows.values()):
            err_console.print(f"{config['method']} has no attention of its own here; drawing the generic occlusion relevance")
            labels = [text, *[p for p in NounPhraseExtractor().extract(text, max_phrases=5) if p != text]]
            drops, _ = occlusion_relevance(method, tensor, labels, method.build_text_processor())
            rows = {"occlusion: cosine drop when a patch is hidden": (labels, np.clip(drops, 0.0, None))}
        png = render_attention_figure(picture, rows, f"{config['method']}: {text}")
        atomic_write_bytes(out, png)
    except (*USER_ERRORS, ImportError) as error:  # ImportError: no noun-phrase backend installed
        fail(str(error))
    console.print(Text(f"wrote {out} ({len(png):,} bytes; rows: {', '.join(rows)})"))


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("tbps-demo"), help="where data, runs and the report go"),
    identities: int = typer.Option(500, help="identities in the synthetic benchmark"),
    epochs: int = typer.Option(6, help="training epochs (shorter: 2, longer: 10)"),
    seed: int = typer.Option(0),
    quick: bool = typer.Option(False, help="a one-minute smoke run (120 identities, 1 epoch)"),
) -> None:
    """Offline demo: synthesise a benchmark, train the baseline, evaluate, write an HTML report."""
    from tbps.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if quick:
        identities, epochs = 120, 1
    try:
        report = run_demo(out, identities=identities, epochs=epochs, seed=seed)
    except USER_ERRORS as error:
        fail(str(error))
    console.print(Text.assemble(("report:", "bold green"), f" {report}"))


if __name__ == "__main__":
    app()
