"""Zero-shot search (issue 16 item 3): CLIP weights stand wherever a checkpoint stands.

The tiny random CLIP of tests/test_clip.py (a Hugging Face folder, OpenAI's state dict, a
TorchScript archive and a reference model written after OpenAI's ``model.py``) is the model.
Rankings are checked against the reference model's own cosine, computed here at the zero-shot
input size (384x128, its 4x4 position grid resampled to 48x16 by this file's own code).
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_clip import CAPTIONS, CONTEXT, GRID, PATCH, clip_files  # noqa: F401  (clip_files is a fixture)
from typer.testing import CliRunner

from tbps.cli.main import app
from tbps.engine.checkpoint import CheckpointError, ModelSource, load_model_source, open_model_source
from tbps.methods.clip_sdm import ZERO_SHOT_IMAGE_SIZE, PromptedTextProcessor
from tbps.models.backbones.clip import CLIP_MEAN, CLIP_STD
from tbps.search.index import IndexCompatibilityError, add_images, build_index, scan_folder, verify_index
from tbps.search.searcher import Searcher

pytestmark = pytest.mark.usefixtures("single_thread")

QUERY = "a man and a red shirt"
PROMPT = "the {} and the shirt"  # words of the tiny BPE vocabulary, so the prompt stays short


# ============================================================================ helpers
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six 384x128 pictures (the zero-shot input size: the resize is the identity)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for n in range(6):
        base = rng.integers(0, 256, size=3)
        pixels = np.clip(base + rng.normal(0, 40, size=(*ZERO_SHOT_IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"person_{n}.png")
    return folder


@pytest.fixture(scope="module")
def openai_file(clip_files, tmp_path_factory) -> Path:
    """OpenAI's state-dict file with OpenAI's BPE file beside it."""
    folder = tmp_path_factory.mktemp("openai")
    shutil.copy(clip_files["openai"], folder / "ViT-tiny.pt")
    shutil.copy(clip_files["bpe"], folder / "bpe_simple_vocab_16e6.txt.gz")
    return folder / "ViT-tiny.pt"


def reference_vectors(clip_files, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text vectors of the reference CLIP (OpenAI's code), images at
    their own size with the position grid resampled bilinearly (IRRA's resize_pos_embed)."""
    from transformers import CLIPTokenizerFast

    reference = clip_files["reference"]
    visual = copy.deepcopy(reference.visual)
    grid = (images.shape[-2] // PATCH, images.shape[-1] // PATCH)
    table = visual.positional_embedding.data
    resized = F.interpolate(table[1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2), size=grid, mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    visual.positional_embedding = torch.nn.Parameter(torch.cat([table[:1], resized]))
    tokenizer = CLIPTokenizerFast.from_pretrained(str(clip_files["hf"]), local_files_only=True)
    ids = tokenizer(texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image = visual(images)[:, 0]
        _, text = reference.encode_text(ids)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def load_pictures(folder: Path) -> tuple[list[Path], torch.Tensor]:
    paths = sorted(folder.glob("*.png"))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    tensors = [(torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1) - mean) / std
               for p in paths]
    return paths, torch.stack(tensors)


def sha256sum_listing(folder: Path, names: list[str]) -> str:
    """What ``sha256sum NAMES | sha256sum`` prints, computed here independently."""
    lines = "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in sorted(names))
    return hashlib.sha256(lines.encode()).hexdigest()


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(output: str) -> str:
    return " ".join(output.split())  # Rich wraps long messages


# ============================================================================ the resolver
def test_clip_folder_and_openai_file_give_clips_own_embeddings(clip_files, openai_file):
    reference = clip_files["reference"]
    images = torch.randn(3, 3, PATCH * GRID, PATCH * GRID)
    with torch.no_grad():
        expected_image = reference.visual(images)[:, 0]
    for weights in (clip_files["hf"], openai_file):
        method, config = load_model_source(weights, image_size=(PATCH * GRID, PATCH * GRID))
        assert not method.training and config["zero_shot"] is True and config["method"] == "clip"
        assert method.identity is None  # no ID head: nothing was trained
        model = config["model"]
        assert model["image_backbone"]["weights"] == model["text_backbone"]["weights"] == str(Path(weights).resolve())
        assert model["image_backbone"]["pretrained"] and model["max_text_length"] == CONTEXT and model["prompt"] is None
        text = method.build_text_processor()(CAPTIONS)
        with torch.no_grad():
            torch.testing.assert_close(method.encode_image(images)["global"], expected_image, atol=1e-5, rtol=1e-4)
            padded = F.pad(text["input_ids"], (0, CONTEXT - text["input_ids"].shape[1]), value=int(text["input_ids"].max()))
            _, expected_text = reference.encode_text(padded)
            torch.testing.assert_close(method.encode_text(text)["global"], expected_text, atol=1e-5, rtol=1e-4)
    # The default input is the person-crop size every CLIP-era method uses.
    _, config = load_model_source(clip_files["hf"])
    assert config["data"]["image_size"] == list(ZERO_SHOT_IMAGE_SIZE) == [384, 128]


def test_a_torchscript_archive_needs_the_bpe_file_beside_it(clip_files, tmp_path):
    archive = tmp_path / "ViT-tiny.pt"
    shutil.copy(clip_files["jit"], archive)
    with pytest.raises(CheckpointError, match=r"--checkpoint .*OpenAI's CLIP file, which carries no tokenizer: put OpenAI's bpe_simple_vocab_16e6.txt.gz"):
        load_model_source(archive)
    shutil.copy(clip_files["bpe"], tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    loaded = open_model_source(archive)
    assert loaded.source == ModelSource("clip", archive.resolve(), "openai")
    assert set(loaded.source.files()) == {"ViT-tiny.pt", "bpe_simple_vocab_16e6.txt.gz"}


def test_wrong_paths_and_non_clip_folders_name_the_option(clip_files, photos, tmp_path):
    with pytest.raises(CheckpointError, match=r"--checkpoint '.*missing' does not exist: give a tbps checkpoint \(.ckpt\), a Hugging Face CLIP folder"):
        load_model_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="--checkpoint .* is a folder but not a Hugging Face CLIP model folder"):
        load_model_source(tmp_path / "empty")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="--checkpoint .* holds a 'bert' model, not CLIP"):
        load_model_source(bert)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(clip_files["hf"] / "config.json", weightless / "config.json")
    with pytest.raises(CheckpointError, match="--checkpoint .* holds no CLIP model tbps can load: .*has no weights"):
        load_model_source(weightless)
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="neither a tbps checkpoint .* nor CLIP weights"):
        load_model_source(other)
    with pytest.raises(CheckpointError, match="holds CLIP weights .* but 'nafs' was expected"):
        load_model_source(clip_files["hf"], expected_method="nafs")
    # ... and on the command line, for every command that takes a checkpoint
    for args in (["index", "build", "--checkpoint", tmp_path / "missing", "--images", photos, "--out", tmp_path / "idx"],
                 ["eval", "--checkpoint", bert, "--dataset", "cuhk-pedes", "--root", tmp_path]):
        result = run(*args)
        assert result.exit_code == 2 and "--checkpoint" in flat(result.output), result.output


def test_prompt_template(clip_files, tmp_path):
    method, config = load_model_source(clip_files["hf"], PROMPT)
    plain, _ = load_model_source(clip_files["hf"])
    assert config["model"]["prompt"] == PROMPT
    prompted = method.build_text_processor()([QUERY, "{x}"])
    direct = plain.build_text_processor()([PROMPT.replace("{}", QUERY), PROMPT.replace("{}", "{x}")])
    assert torch.equal(prompted["input_ids"], direct["input_ids"])  # formatted before tokenising
    assert not torch.equal(prompted["input_ids"], plain.build_text_processor()([QUERY, "{x}"])["input_ids"])
    processor = pickle.loads(pickle.dumps(method.build_text_processor()))  # data-loader workers pickle it
    assert isinstance(processor, PromptedTextProcessor) and processor.eos_id == plain.build_text_processor().eos_id
    assert torch.equal(processor([QUERY])["input_ids"], prompted["input_ids"][:1, : processor([QUERY])["input_ids"].shape[1]])
    for bad in ("a photo", "{} and {}", "{0} photo"):
        with pytest.raises(ValueError, match=r"--prompt / model.prompt\) must contain \{\} exactly once"):
            load_model_source(clip_files["hf"], bad)

    # A checkpoint of method clip takes a prompt too; a method without one refuses it, and a
    # checkpoint refuses another image size than it was trained at.
    saved = tmp_path / "clip.ckpt"
    torch.save({"tbps": {"method": "clip", "num_classes": 0, "config": config | {"model": {**config["model"], "prompt": None}}},
                "state_dict": {f"method.{k}": v for k, v in plain.state_dict().items()}}, saved)
    from_checkpoint, saved_config = load_model_source(saved, PROMPT)
    assert saved_config["model"]["prompt"] == PROMPT
    assert torch.equal(from_checkpoint.build_text_processor()([QUERY])["input_ids"], prompted["input_ids"][:1, : prompted["attention_mask"][0].sum()])
    with pytest.raises(CheckpointError, match="was trained at 384x128, but images of 64x32 were asked for"):
        load_model_source(saved, image_size=(64, 32))
    baseline = tmp_path / "baseline.ckpt"
    torch.save({"tbps": {"method": "baseline", "num_classes": 3, "config": {"data": {"image_size": [64, 32]}, "model": {}}},
                "state_dict": {}}, baseline)
    with pytest.raises(CheckpointError, match="--prompt applies to CLIP models .* holds method 'baseline'"):
        load_model_source(baseline, PROMPT)


# ============================================================================ index, search, serve
@pytest.fixture(scope="module")
def zero_shot_index(clip_files, photos, tmp_path_factory) -> tuple[Path, Path]:
    """(index, CLIP folder): an index of the photos built from a copy of the CLIP folder, with PROMPT."""
    root = tmp_path_factory.mktemp("zero-shot")
    weights = Path(shutil.copytree(clip_files["hf"], root / "clip"))
    build_index(weights, scan_folder(photos), root / "index", batch_size=4, prompt=PROMPT)
    return root / "index", weights


def test_zero_shot_index_records_the_model_and_ranks_by_clips_cosine(clip_files, photos, zero_shot_index):
    index, weights = zero_shot_index
    manifest = json.loads((index / "manifest.json").read_text())
    names = sorted(manifest["model_source"]["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert manifest["checkpoint"] == str(weights.resolve()) and manifest["model_source"]["kind"] == "clip"
    assert manifest["checkpoint_sha256"] == sha256sum_listing(weights, names)  # the weights' hash, not a checkpoint's
    assert manifest["config"]["zero_shot"] is True and manifest["config"]["model"]["prompt"] == PROMPT
    assert manifest["image_size"] == [384, 128] and verify_index(index) == []

    paths, images = load_pictures(photos)
    searcher = Searcher.open(index)  # the index's own weights and prompt
    hits = searcher.search(QUERY, k=6)
    image_vectors, text_vectors = reference_vectors(clip_files, images, [PROMPT.replace("{}", QUERY), QUERY])
    expected = (text_vectors @ image_vectors.t()).numpy()
    assert [Path(hit.path).name for hit in hits] == [paths[i].name for i in np.argsort(-expected[0], kind="stable")]
    np.testing.assert_allclose([hit.score for hit in hits], np.sort(expected[0])[::-1], atol=1e-4)
    # '{}' searches without the index's prompt: the plain query's cosine
    plain = Searcher.open(index, prompt="{}").search(QUERY, k=6)
    np.testing.assert_allclose([hit.score for hit in plain], np.sort(expected[1])[::-1], atol=1e-4)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)
    # "more like this": the stored vectors are CLIP's image embeddings
    np.testing.assert_allclose(np.asarray(searcher.index.vectors), image_vectors.numpy(), atol=1e-4)


def test_zero_shot_index_is_served(zero_shot_index):
    from fastapi.testclient import TestClient

    from tbps.search.service import create_app

    index, _ = zero_shot_index
    expected = Searcher.open(index).search(QUERY, k=5)
    client = TestClient(create_app(index), base_url="http://localhost", raise_server_exceptions=False)
    body = client.get("/api/search", params={"q": QUERY, "k": 5}).json()
    assert [hit["id"] for hit in body["hits"]] == [hit.id for hit in expected]
    np.testing.assert_allclose([hit["score"] for hit in body["hits"]], [hit.score for hit in expected], atol=1e-4)
    assert client.get("/api/info").json()["method"] == "clip"
    plain = TestClient(create_app(index, prompt="{}"), base_url="http://localhost").get("/api/search", params={"q": QUERY, "k": 5}).json()
    assert [hit["score"] for hit in plain["hits"]] != [hit["score"] for hit in body["hits"]]
    with pytest.raises(ValueError, match="exactly once"):
        create_app(index, prompt="no slot")


def test_zero_shot_cli_build_add_search_verify_and_refuse_other_weights(clip_files, photos, tmp_path):
    weights = Path(shutil.copytree(clip_files["hf"], tmp_path / "clip"))
    first, more = tmp_path / "first", tmp_path / "more"
    first.mkdir()
    more.mkdir()
    for n, picture in enumerate(sorted(photos.glob("*.png"))):
        shutil.copy(picture, (first if n < 4 else more) / picture.name)
    index = tmp_path / "crops.idx"
    result = run("index", "build", "--checkpoint", weights, "--images", first, "--out", index, "--prompt", PROMPT, "--workers", 0)
    assert result.exit_code == 0, result.output
    result = run("index", "add", index, "--images", more, "--workers", 0)
    assert result.exit_code == 0 and "added 2 images" in result.output, result.output
    assert run("index", "verify", index).exit_code == 0
    result = run("search", index, QUERY, "--json", "-k", 6)
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["hits"]
    expected = Searcher.open(index).search(QUERY, k=6)
    assert [hit["id"] for hit in hits] == [hit.id for hit in expected] and len(hits) == 6
    result = run("search", index, QUERY, "--prompt", "a photo")
    assert result.exit_code == 2 and "must contain {} exactly once" in flat(result.output)

    # Other weights: a copy with one tensor changed is another model; the index refuses it.
    from safetensors.torch import load_file, save_file

    changed = Path(shutil.copytree(weights, tmp_path / "changed"))
    tensors = load_file(changed / "model.safetensors")
    tensors["visual_projection.weight"] = tensors["visual_projection.weight"] * 1.5
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    result = run("search", index, QUERY, "--checkpoint", changed)
    assert result.exit_code == 2 and "differs from the one the index was built with" in flat(result.output)
    result = run("index", "verify", index, "--checkpoint", changed)
    assert result.exit_code == 1 and "differs from the one the index was built with" in flat(result.output)
    with pytest.raises(IndexCompatibilityError):
        add_images(index, scan_folder(more), checkpoint=changed)
    # ... and so is the index's own folder once its weights change: verify names the file
    shutil.copy(changed / "model.safetensors", weights / "model.safetensors")
    problems = verify_index(index)
    assert len(problems) == 1 and "CLIP weights" in problems[0] and "has changed since the index was built" in problems[0]
    assert problems[0].endswith("files changed, added or removed: model.safetensors")
    result = run("search", index, QUERY)
    assert result.exit_code == 2 and "differs from the one the index was built with" in flat(result.output)
    shutil.rmtree(weights)
    assert verify_index(index) == [f"the index's CLIP weights {str(weights.resolve())!r} is missing: pass --checkpoint to search"]


# ============================================================================ tbps eval
def test_eval_takes_a_clip_folder(clip_files, tiny_synthetic, tmp_path):
    out = tmp_path / "zero-shot.json"
    result = run("eval", "--checkpoint", clip_files["hf"], "--dataset", "cuhk-pedes", "--root", tiny_synthetic,
                 "--device", "cpu", "--batch-size", 64, "--json", out, "--prompt", PROMPT)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["method"] == "clip" and payload["zero_shot"] is True and payload["prompt"] == PROMPT
    assert 0 <= payload["metrics"]["text-to-image"]["R1"] <= 100 and payload["num_queries"] > 0
    result = run("eval", "--checkpoint", clip_files["hf"])
    assert result.exit_code == 2 and "pass --dataset NAME --root DIR" in flat(result.output)
