"""Attention figures: each method's ``visualize`` rows, ``render_attention_figure`` and ``tbps explain``.

Tiny randomly initialised models (EfficientNet-Lite0 with ``pretrained: false``; the bundled
MiniLM's architecture cut to two layers, or a small Bi-LSTM), 64x32 images made here.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tbps.models.registry import create_method
from tbps.search.searcher import render_attention_figure
from tbps.text.tokenizers import WordVocabulary

IMAGE_SIZE = (64, 32)
CAPTION = "a man in a red shirt, blue jeans and black shoes."
EFFICIENTNET = {"name": "efficientnet_lite0", "pretrained": False}
MINILM = {"name": "minilm", "pretrained": False}
BILSTM = {"name": "bilstm", "embedding_dim": 12, "hidden_size": 16, "min_count": 1}

# Tensors here are tiny: intra-op threads only add synchronisation (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def build(name: str, config: dict, fit: list[str] | None = None, layers: int | None = 2, image_size=IMAGE_SIZE):
    torch.manual_seed(0)
    method = create_method(name, config, num_classes=3, image_size=image_size)
    backbone = getattr(method.text_backbone, "backbone", method.text_backbone)  # NAFS wraps its encoder
    if layers is not None and hasattr(backbone, "model"):
        backbone.model.encoder.layer = backbone.model.encoder.layer[:layers]
    if fit is not None:
        method.fit_text(fit)
    return method


def image(size=IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(3, *size, generator=torch.Generator().manual_seed(2))


def check_rows(rows, titles):
    """Row titles in order, one map per label, non-negative finite maps, and a PNG that opens."""
    assert list(rows) == titles
    for labels, maps in rows.values():
        assert maps.dim() == 3 and maps.shape[0] == len(labels) > 0
        assert torch.isfinite(maps).all() and (maps >= 0).all()
    png = render_attention_figure(Image.new("RGB", (IMAGE_SIZE[1], IMAGE_SIZE[0]), "gray"), rows, "a caption")
    with Image.open(io.BytesIO(png)) as figure:
        assert figure.format == "PNG"
        figure.load()
    return png


# ------------------------------------------------------------------------------ per method


def test_nafs_rows_sentence_sub_sentences_and_wordpiece_words():
    nafs = build("nafs", {"embed_dim": 16, "max_text_length": 24, "max_sub_sentences": 4,
                          "image_backbone": EFFICIENTNET, "text_backbone": MINILM})
    nafs.train()
    rows = nafs.visualize(image(), CAPTION)
    check_rows(rows, ["sentence", "sub-sentences", "words"])
    assert rows["sentence"][0] == [CAPTION]
    assert rows["sub-sentences"][0] == ["a man in a red shirt", "blue jeans and black shoes"]
    tokens, _ = nafs.build_text_processor().base.tokenize_with_spans(CAPTION)
    assert rows["words"][0] == tokens  # the caption's WordPiece tokens, no [CLS] / [SEP] / padding
    # alpha' sums to 1 over the image features, and each feature spreads its weight over its rows.
    for _, maps in rows.values():
        torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(len(maps)))
    assert nafs.training  # the caller's mode is restored
    # explain() is the sentence and sub-sentence part of the same attention
    names, maps = nafs.explain(image(), CAPTION)
    assert names == rows["sentence"][0] + rows["sub-sentences"][0]
    torch.testing.assert_close(maps, torch.cat([rows["sentence"][1], rows["sub-sentences"][1]]))


@pytest.fixture(scope="module")
def nafs_bilstm_config():
    return {"embed_dim": 16, "max_text_length": 24, "max_sub_sentences": 4, "image_network": "plain",
            "image_backbone": EFFICIENTNET, "text_backbone": BILSTM}


@pytest.fixture(scope="module")
def nafs_bilstm(nafs_bilstm_config):
    return build("nafs", nafs_bilstm_config, fit=["a man in a red shirt", "black shoes"])


def test_nafs_bilstm_words_are_the_caption_words_even_out_of_vocabulary(nafs_bilstm):
    rows = nafs_bilstm.visualize(image(), CAPTION)
    check_rows(rows, ["sentence", "sub-sentences", "words"])
    assert rows["words"][0] == WordVocabulary.tokenize(CAPTION)  # "jeans" is not in the vocabulary


def test_nafs_global_only_has_no_attention():
    nafs = build("nafs", {"embed_dim": 16, "scales": "global", "image_backbone": EFFICIENTNET, "text_backbone": BILSTM},
                 fit=[CAPTION])
    assert nafs.visualize(image(), CAPTION) is None


def test_acsa_one_entry_per_noun_phrase_named_by_its_entity():
    acsa = build("acsa", {"embed_dim": 16, "max_text_length": 24, "image_backbone": EFFICIENTNET,
                          "text_backbone": MINILM, "phrases": {"max_phrases": 4, "max_length": 8}})
    rows = acsa.visualize(image(), CAPTION)
    check_rows(rows, ["noun phrase → visual entity"])
    labels, maps = rows["noun phrase → visual entity"]
    phrases = acsa.build_text_processor().phrases([CAPTION])[0]
    assert len(labels) == len(phrases) >= 2
    for label, phrase in zip(labels, phrases):
        head, _, tail = label.partition(" → ")
        entity, weight = tail.rsplit(" ", 1)
        assert head == phrase and entity in acsa.visual_entity_names and 0.0 < float(weight) <= 1.0
    assert maps.shape == (len(phrases), 6, 1)  # the six horizontal parts
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(len(phrases)))
    # relation I (global alignment only) has no cross-attention to show
    assert build("acsa", {"embed_dim": 16, "relations": "I", "image_backbone": EFFICIENTNET, "text_backbone": BILSTM},
                 fit=[CAPTION]).visualize(image(), CAPTION) is None


def test_isanet_rgl_map_and_one_map_per_topic_centre_with_its_words():
    size = (64, 64)  # EfficientNet-Lite0 -> a 2 x 2 map
    isanet = build("isanet", {
        "global_dim": 16, "local_dim": 8, "max_text_length": 16, "image_backbone": EFFICIENTNET, "text_backbone": BILSTM,
        "rgl": {"mode": "relation", "chunk_size": 3, "relation_reduction": 256}, "ila": {"num_centres": 3},
    }, fit=[CAPTION], image_size=size)
    rows = isanet.visualize(image(size), CAPTION)
    check_rows(rows, ["RGL attention", "topic centres (image)"])
    assert rows["RGL attention"][1].shape == (1, 2, 2)
    assert ((rows["RGL attention"][1] > 0) & (rows["RGL attention"][1] < 1)).all()  # a sigmoid
    labels, maps = rows["topic centres (image)"]
    assert maps.shape == (3, 2, 2) and len(labels) == 3
    torch.testing.assert_close(maps.sum(dim=0), torch.ones(2, 2))  # soft assignment over K
    words = set(WordVocabulary.tokenize(CAPTION))
    for k, label in enumerate(labels, start=1):
        head, _, listed = label.partition(": ")
        assert head == f"topic {k}"
        entries = [entry.rsplit(" ", 1) for entry in listed.split(", ")]
        assert len(entries) == 3 and all(word in words and 0.0 <= float(w) <= 1.0 for word, w in entries)


def test_laip_forward_and_bidirectional_maps_of_the_same_phrases():
    laip = build("laip", {"embed_dim": 16, "max_text_length": 24, "max_phrase_length": 10, "max_phrases": 3,
                          "queue_size": 8, "text_layers": 3, "attention_layer": 1, "cross_attention": {"heads": 4},
                          "image_backbone": EFFICIENTNET, "text_backbone": MINILM}, layers=None)
    laip.train()
    rows = laip.visualize(image(), CAPTION)
    check_rows(rows, ["forward attention", "bidirectional attention"])
    forward, bidirectional = rows["forward attention"], rows["bidirectional attention"]
    assert forward[0] == bidirectional[0] and len(forward[0]) >= 2
    assert forward[1].shape == bidirectional[1].shape
    for maps in (forward[1], bidirectional[1]):
        torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(len(maps)))
    assert laip.training  # the caller's mode is restored


def test_default_visualize_is_the_explain_row():
    baseline = build("baseline", {"embed_dim": 16, "image_backbone": EFFICIENTNET, "text_backbone": BILSTM}, fit=[CAPTION])
    assert baseline.visualize(image(), CAPTION) is None  # no attention of its own
    maps = torch.rand(2, 4, 2)
    baseline.explain = lambda image, text: (["a", "b"], maps)
    assert baseline.visualize(image(), CAPTION) == {"attention": (["a", "b"], maps)}


# ------------------------------------------------------------------------------ renderer


def test_renderer_wraps_long_rows_and_refuses_bad_maps():
    picture = Image.new("RGB", (32, 64), "gray")
    short = render_attention_figure(picture, {"one": (["x"], np.ones((1, 3, 1)))}, "t", max_columns=4)
    long = render_attention_figure(picture, {"one": ([str(i) for i in range(9)], np.random.rand(9, 3, 1))}, "t", max_columns=4)
    with Image.open(io.BytesIO(short)) as a, Image.open(io.BytesIO(long)) as b:
        assert b.width > a.width and b.height > a.height  # 4 columns, 3 lines of panels
    with pytest.raises(ValueError, match="labels"):
        render_attention_figure(picture, {"one": (["x", "y"], np.ones((1, 3, 1)))}, "t")
    with pytest.raises(ValueError, match="nothing to draw"):
        render_attention_figure(picture, {"one": ([], np.ones((0, 3, 1)))}, "t")


# ------------------------------------------------------------------------------ tbps explain


def write_checkpoint(method, name: str, model_config: dict, path):
    config = {"method": name, "seed": 0, "model": model_config, "data": {"image_size": list(IMAGE_SIZE)}}
    torch.save(
        {"tbps": {"format": 1, "method": name, "config": config, "num_classes": method.num_classes, "label_map": {}},
         "state_dict": {f"method.{k}": v for k, v in method.state_dict().items()}},
        path,
    )
    return path


@pytest.fixture(scope="module")
def person_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "person.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_explain_writes_the_figure(nafs_bilstm, nafs_bilstm_config, person_png, tmp_path):
    from tbps.cli.main import app

    checkpoint = write_checkpoint(nafs_bilstm, "nafs", nafs_bilstm_config, tmp_path / "nafs.ckpt")
    out = tmp_path / "figures" / "nafs.png"
    runner = CliRunner()
    result = runner.invoke(app, ["explain", "--checkpoint", str(checkpoint), str(person_png), CAPTION, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "rows: sentence, sub-sentences, words" in " ".join(result.output.split())
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width > 40
    assert [p.name for p in out.parent.iterdir()] == ["nafs.png"]  # no temporary file left

    for args, message in (
        ([str(tmp_path / "missing.png"), CAPTION], "file not found"),
        ([str(checkpoint), CAPTION], "cannot load image"),  # not an image
        ([str(person_png), "   "], "empty"),
    ):
        result = runner.invoke(app, ["explain", "--checkpoint", str(checkpoint), *args, "--out", str(tmp_path / "x.png")])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output  # rich wraps lines
    assert not (tmp_path / "x.png").exists()


def test_cli_explain_falls_back_to_occlusion_for_the_baseline(person_png, tmp_path):
    from tbps.cli.main import app

    config = {"embed_dim": 16, "image_backbone": EFFICIENTNET, "text_backbone": BILSTM}
    checkpoint = write_checkpoint(build("baseline", config, fit=[CAPTION]), "baseline", config, tmp_path / "baseline.ckpt")
    out = tmp_path / "baseline.png"
    result = CliRunner().invoke(app, ["explain", "--checkpoint", str(checkpoint), str(person_png), CAPTION, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "occlusion relevance" in " ".join(result.output.split())
    with Image.open(out) as figure:
        assert figure.format == "PNG"
