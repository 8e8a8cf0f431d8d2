"""Method registry, backbones (shapes, offline weight errors, freezing) and configs."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from tbps.config import CONFIG_DIR, load_config, save_config
from tbps.models import create_method, list_methods
from tbps.models.backbones import BackboneWeightsError, create_image_backbone, create_text_backbone
from tbps.models.backbones.text import accepted_text_options


def test_registry_lists_and_builds_methods():
    methods = list_methods()
    assert "baseline" in methods and methods["baseline"]
    with pytest.raises(ValueError, match="registered methods: .*baseline"):
        create_method("no-such-method", {}, num_classes=3)


def test_methods_command_prints_descriptions():
    from tbps.cli.main import app

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    assert "baseline" in result.output and "CMPM" in result.output


@pytest.mark.parametrize(
    ("name", "size", "stages", "last_channels"),
    [("efficientnet_lite0", (64, 32), 5, 1280), ("resnet50", (64, 32), 4, 2048), ("swin_t", (224, 224), 4, 768), ("vit_b_16", (64, 32), 1, 768)],
)
def test_image_backbones_return_stage_maps(name, size, stages, last_channels):
    backbone = create_image_backbone({"name": name, "pretrained": name == "efficientnet_lite0"}, image_size=size)
    output = backbone(torch.randn(1, 3, *size))
    assert len(output.feature_maps) == stages
    assert output.feature_maps[-1].shape[1] == last_channels == backbone.out_channels
    assert (output.cls_token is not None) == (name == "vit_b_16")


def test_resnet_last_stride_one_keeps_resolution():
    backbone = create_image_backbone({"name": "resnet50", "pretrained": False, "last_stride": 1})
    maps = backbone(torch.randn(1, 3, 128, 64)).feature_maps
    assert maps[-1].shape[-2:] == maps[-2].shape[-2:] == (8, 4)


def test_efficientnet_last_stride_one_keeps_the_last_stage_at_one_sixteenth():
    strided = create_image_backbone({"name": "efficientnet_lite0", "pretrained": True})
    kept = create_image_backbone({"name": "efficientnet_lite0", "pretrained": True, "last_stride": 1})
    # Same stages, same pretrained weights (the option changes a stride and a padding, no tensor).
    assert kept.channels == strided.channels and kept.stage_ends == strided.stage_ends
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), strided.state_dict().values()))
    assert strided.feature_map_sizes((128, 48))[-2:] == [(8, 3), (4, 1)]
    assert kept.feature_map_sizes((128, 48))[-2:] == [(8, 3), (8, 3)]
    assert kept.feature_map_sizes((192, 64))[-1] == (12, 4)
    # Everything before the changed block computes exactly what the strided network computes.
    kept.eval(), strided.eval()
    images = torch.randn(2, 3, 128, 48)
    for a, b in zip(kept(images).feature_maps[:-1], strided(images).feature_maps[:-1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("name", "last_stride"), [("efficientnet_lite0", 3), ("resnet50", 4), ("swin_t", 1), ("vit_b_16", 2)])
def test_backbones_refuse_a_last_stride_they_do_not_have(name, last_stride):
    with pytest.raises(ValueError, match="last_stride"):
        create_image_backbone({"name": name, "pretrained": False, "last_stride": last_stride})


@pytest.mark.parametrize("name", ["resnet50", "swin_t", "vit_b_16"])
def test_missing_pretrained_weights_name_the_option(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(BackboneWeightsError, match="model.image_backbone.weights="):
        create_image_backbone({"name": name, "pretrained": True})


def test_image_weights_from_a_local_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r50.pth")
    loaded = create_image_backbone({"name": "resnet50", "weights": str(tmp_path / "r50.pth")})
    torch.testing.assert_close(loaded.stem[0].weight, reference.conv1.weight)
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="does not fit"):
        create_image_backbone({"name": "resnet50", "weights": str(tmp_path / "bad.pth")})


def test_missing_text_model_names_the_option(tmp_path):
    with pytest.raises(BackboneWeightsError, match="model.text_backbone.weights="):
        create_text_backbone({"name": "bert-base-uncased"})
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        create_text_backbone({"name": "bert-base-uncased", "weights": str(tmp_path / "nowhere")})


def test_text_backbones_refuse_options_they_do_not_use():
    """A setting meant for another encoder is an error naming it, never silently dropped; null
    clears a key (how an override switching ``name`` drops the previous encoder's options)."""
    with pytest.raises(ValueError, match=r"text backbone 'bilstm' has no option\(s\) \['freeze_layers', 'pretrained'\]"):
        create_text_backbone({"name": "bilstm", "pretrained": True, "freeze_layers": 3, "min_count": 1})
    with pytest.raises(ValueError, match=r"text backbone 'minilm' has no option\(s\) \['hidden_size'\]"):
        create_text_backbone({"name": "minilm", "pretrained": False, "hidden_size": 512})
    bilstm = create_text_backbone({"name": "bilstm", "pretrained": None, "freeze_layers": None, "hidden_size": 8, "embedding_dim": 4})
    assert bilstm.hidden_size == 8
    # A bundled MiniLM config switched to a Bi-LSTM from the command line without clearing its options.
    config = load_config("baseline/synthetic", ["model.text_backbone.name=bilstm"])
    with pytest.raises(ValueError, match="set one to null"):
        create_text_backbone(config.model.text_backbone)
    # A checkpoint's config from before the refusal keeps only what its encoder read.
    old_run = {"name": "bilstm", "pretrained": True, "weights": None, "freeze_layers": 3, "min_count": 1}
    assert accepted_text_options(old_run) == {"name": "bilstm", "min_count": 1}
    assert accepted_text_options({"name": "minilm", "hidden_size": 8, "freeze_layers": 3}) == {"name": "minilm", "freeze_layers": 3}


def test_freezing_stops_gradients_and_keeps_batchnorm_statistics():
    backbone = create_image_backbone({"name": "efficientnet_lite0", "freeze_stages": 2})
    backbone.train()
    frozen, trainable = backbone.stage_modules()[:2], backbone.stage_modules()[2:]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    assert all(not m.training for stage in frozen for child in stage for m in child.modules())
    before = [b.running_mean.clone() for stage in frozen for b in stage.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    backbone(torch.randn(2, 3, 64, 32)).feature_maps[-1].sum().backward()
    after = [b.running_mean for stage in frozen for b in stage.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="freeze_stages"):
        create_image_backbone({"name": "efficientnet_lite0", "pretrained": False, "freeze_stages": 9})

    text = create_text_backbone({"name": "minilm", "freeze_layers": 3})
    layers = text.model.encoder.layer
    assert not any(p.requires_grad for p in text.model.embeddings.parameters())
    assert not any(p.requires_grad for layer in layers[:3] for p in layer.parameters())
    assert all(p.requires_grad for layer in layers[3:] for p in layer.parameters())


def test_bilstm_vocabulary_travels_in_the_state_dict():
    config = {"name": "bilstm", "embedding_dim": 8, "hidden_size": 6, "min_count": 1}
    trained = create_text_backbone(config)
    trained.fit(["a man in a red coat", "a woman with a black bag"])
    processor = trained.build_processor(12)
    batch = processor(["a red bag"])
    rebuilt = create_text_backbone(config)
    rebuilt.load_state_dict(trained.state_dict())
    assert len(rebuilt.vocabulary) == len(trained.vocabulary)
    torch.testing.assert_close(rebuilt(batch).sentence, trained(batch).sentence)
    assert rebuilt(batch).tokens.shape == (1, 12, 6)


def test_baseline_encodes_and_returns_named_losses():
    config = load_config("baseline/synthetic", ["model.embed_dim=16", "model.text_backbone.name=bilstm", "model.text_backbone.pretrained=null", "model.text_backbone.freeze_layers=null", "model.text_backbone.min_count=1"])
    method = create_method("baseline", config.model, num_classes=3, image_size=(64, 32))
    method.fit_text(["a man in a red coat", "a woman in a blue dress"])
    text = method.build_text_processor()(["a man in a red coat", "a woman in a blue dress", "a red dress"])
    batch = {"images": torch.randn(3, 3, 64, 32), "text": text, "labels": torch.tensor([0, 1, 2])}
    losses = method(batch)
    assert set(losses) == {"cmpm", "cmpc"}
    sum(losses.values()).backward()
    assert method.image_projection[1].weight.grad is not None
    method.eval()
    with torch.no_grad():
        images, texts = method.encode_image(batch["images"]), method.encode_text(text)
        similarity = method.similarity(texts, images)
        assert similarity.shape == (3, 3) and similarity.abs().max() <= 1 + 1e-5
        candidates = torch.tensor([[2, 0], [1, 2], [0, 1]])
        torch.testing.assert_close(method.score_candidates(texts, images, candidates), similarity.gather(1, candidates))
    # The Bi-LSTM has no pretrained weights: it trains at the new layers' rate, the image backbone at the backbone's.
    groups = {name: {id(p) for p in params} for name, params in method.parameter_groups().items()}
    assert all(id(p) in groups["new"] for p in method.text_backbone.parameters())
    assert all(id(p) in groups["backbone"] for p in method.image_backbone.parameters() if p.requires_grad)


def test_config_overrides_and_round_trip(tmp_path):
    config = load_config("baseline/synthetic", ["optim.lr=0.5", "data.image_size=[32,16]"])
    assert config.optim.lr == 0.5 and list(config.data.image_size) == [32, 16]
    assert config.trainer.precision == "32-true"  # a default filled in from DEFAULTS
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(path).optim.lr == 0.5
    with pytest.raises(FileNotFoundError, match="baseline/synthetic"):
        load_config("nope/nothing")
    with pytest.raises(ValueError, match="key=value"):
        load_config("baseline/synthetic", ["optim.lr"])


_FEATURE_MAP_COMMENT = re.compile(r"final feature map (\d+)x(\d+)")
_MEASURED_MAPS: dict[tuple, tuple[int, int]] = {}


@pytest.mark.parametrize("config_file", sorted(CONFIG_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_states_its_true_feature_map_size(config_file):
    """Each bundled config says, in a comment, the final map its backbone gives at its input size
    (what a local-alignment method has to align); the backbone's own forward pass checks it."""
    stated = _FEATURE_MAP_COMMENT.findall(config_file.read_text())
    assert len(stated) == 1, f"{config_file.name} must state 'final feature map HxW' exactly once"
    config = load_config(config_file)
    backbone_config = {key: value for key, value in dict(config.model.image_backbone).items() if key != "weights"}
    backbone_config["pretrained"] = False  # the map size does not depend on the weights
    size = tuple(int(v) for v in config.data.image_size)
    key = (tuple(sorted((k, str(v)) for k, v in backbone_config.items())), size)
    if key not in _MEASURED_MAPS:
        _MEASURED_MAPS[key] = create_image_backbone(backbone_config, image_size=size).feature_map_sizes(size)[-1]
    assert tuple(int(v) for v in stated[0]) == _MEASURED_MAPS[key]
