"""CLIP backbones from local weights, the CLIP + SDM method, the seed methods on CLIP, and the
backbone stage API (issue 16).

No real weights: a tiny OpenAI-architecture CLIP is written here, literally after OpenAI's
``model.py`` (nn.MultiheadAttention with its fused in_proj, QuickGELU, IRRA's ln_post + proj on
every token), randomly initialised, and saved three ways: as OpenAI's state dict
(``torch.save``), as a TorchScript archive (``torch.jit.save``, what OpenAI ships) and as a
Hugging Face CLIP folder (``save_pretrained``, weights mapped by the test's own table below). All
three must load into tbps's backbones and give the reference model's outputs. A tiny byte-level
BPE tokenizer is made here too, in Hugging Face's and in OpenAI's ``.txt.gz`` format.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbps.config import CONFIG_DIR, load_config
from tbps.losses import sdm_loss
from tbps.models.backbones import BackboneWeightsError, create_image_backbone, create_text_backbone
from tbps.models.backbones.clip import (
    CLIP_MEAN,
    NotClipModelError,
    _bytes_to_unicode,
    read_torchscript_tensors,
    resize_position_embedding,
)
from tbps.models.registry import create_method

# Tensors here are tiny: intra-op threads only add synchronisation (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH, LAYERS, PATCH, GRID, EMBED, CONTEXT = 64, 2, 8, 4, 32, 16  # 64 wide: 1 head (OpenAI's width / 64)
IMAGE = (PATCH * GRID, PATCH * GRID)  # the pretrained resolution, 32 x 32
CAPTIONS = ["the man and the shirt", "a woman in a red shirt and long blue jeans with a black bag", "the shirt", "a man"]
LABELS = torch.tensor([0, 1, 0, 2])
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("s", "h"), ("i", "r"), ("ir", "t</w>"), ("sh", "irt</w>"),
          ("m", "a"), ("ma", "n</w>"), ("r", "e"), ("re", "d</w>")]


# ============================================================================ the reference CLIP
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x):  # [L, N, D]
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn(GRID * GRID + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, LAYERS)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x) @ self.proj  # IRRA: every token


class ReferenceCLIP(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.visual = VisionTransformer()
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu_(1)
        self.transformer = Transformer(WIDTH, LAYERS, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab_size, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, WIDTH))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        with torch.no_grad():  # every tensor random, LayerNorms included, so a swapped name shows
            for name, parameter in self.named_parameters():
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter) if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight"))
                                else 0.1 * torch.randn_like(parameter))

    def encode_text(self, ids):  # ids padded to CONTEXT; EOT is the highest id (OpenAI's argmax)
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)) @ self.text_projection
        return x, x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]


def hf_names(openai: dict) -> dict:
    """The test's own OpenAI -> Hugging Face CLIPModel table (independent of tbps's)."""
    out = {"logit_scale": openai["logit_scale"]}
    for tower, source, target in (("vision", "visual.transformer.resblocks.", "vision_model.encoder.layers."),
                                  ("text", "transformer.resblocks.", "text_model.encoder.layers.")):
        for i in range(LAYERS):
            q, k, v = openai[f"{source}{i}.attn.in_proj_weight"].split(WIDTH)
            qb, kb, vb = openai[f"{source}{i}.attn.in_proj_bias"].split(WIDTH)
            out.update({f"{target}{i}.self_attn.q_proj.weight": q, f"{target}{i}.self_attn.k_proj.weight": k,
                        f"{target}{i}.self_attn.v_proj.weight": v, f"{target}{i}.self_attn.q_proj.bias": qb,
                        f"{target}{i}.self_attn.k_proj.bias": kb, f"{target}{i}.self_attn.v_proj.bias": vb})
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{target}{i}.{b}.weight"] = openai[f"{source}{i}.{a}.weight"]
                out[f"{target}{i}.{b}.bias"] = openai[f"{source}{i}.{a}.bias"]
    out.update({
        "vision_model.embeddings.patch_embedding.weight": openai["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": openai["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": openai["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": openai["visual.ln_pre.weight"], "vision_model.pre_layrnorm.bias": openai["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": openai["visual.ln_post.weight"], "vision_model.post_layernorm.bias": openai["visual.ln_post.bias"],
        "visual_projection.weight": openai["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": openai["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": openai["positional_embedding"],
        "text_model.final_layer_norm.weight": openai["ln_final.weight"], "text_model.final_layer_norm.bias": openai["ln_final.bias"],
        "text_projection.weight": openai["text_projection"].t(),
    })
    return out


class Holder(nn.Module):
    """A module tree holding tensors under given dotted names (what torch.jit.save archives)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def scripted_archive(state: dict, path: Path) -> None:
    root = Holder()
    for name, value in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, Holder())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """``{"hf": folder, "openai": state-dict file, "jit": TorchScript archive, "bpe": .txt.gz, "reference": model}``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    root = tmp_path_factory.mktemp("clip")
    symbols = list(_bytes_to_unicode().values())
    vocabulary = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    raw = root / "raw-tokenizer"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocabulary)}))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
    with gzip.open(root / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as handle:  # OpenAI's format
        handle.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(" ".join(m) for m in MERGES) + "\n")

    torch.manual_seed(0)
    reference = ReferenceCLIP(len(vocabulary)).eval()
    openai_state = {k: v for k, v in reference.state_dict().items()}
    openai_dir = root / "openai"
    openai_dir.mkdir()
    torch.save(openai_state, openai_dir / "ViT-tiny.pt")
    (root / "jit").mkdir()
    scripted_archive(openai_state, root / "jit" / "ViT-tiny.pt")

    vision = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=1,
                  image_size=IMAGE[0], patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=EMBED)
    text = dict(vocab_size=len(vocabulary), hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                num_attention_heads=1, max_position_embeddings=CONTEXT, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=EMBED, bos_token_id=len(vocabulary) - 2, eos_token_id=len(vocabulary) - 1, pad_token_id=len(vocabulary) - 1)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=EMBED))
    missing, unexpected = model.load_state_dict(hf_names(openai_state), strict=False)
    assert not unexpected and all(key.endswith("position_ids") for key in missing)
    model.save_pretrained(root / "hf")
    CLIPTokenizerFast.from_pretrained(str(raw), local_files_only=True).save_pretrained(root / "hf")
    return {"hf": root / "hf", "openai": openai_dir / "ViT-tiny.pt", "jit": root / "jit" / "ViT-tiny.pt",
            "bpe": root / "bpe_simple_vocab_16e6.txt.gz", "reference": reference, "root": root}


def image_backbone(weights, size=IMAGE, **extra):
    return create_image_backbone({"name": "clip", "weights": str(weights), **extra}, image_size=size).eval()


def text_backbone(weights, **extra):
    return create_text_backbone({"name": "clip", "weights": str(weights), **extra}).eval()


# ============================================================================ 1. backbones
def test_hf_folder_openai_file_and_jit_archive_give_the_reference_outputs(clip_files):
    reference = clip_files["reference"]
    images = torch.randn(3, 3, *IMAGE)
    with torch.no_grad():
        expected = reference.visual(images)
        outputs = [image_backbone(clip_files[kind])(images) for kind in ("hf", "openai", "jit")]
    for output in outputs:
        assert output.feature_maps[0].shape == (3, EMBED, GRID, GRID)
        torch.testing.assert_close(output.cls_token, expected[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(output.feature_maps[0].flatten(2).transpose(1, 2), expected[:, 1:], atol=1e-5, rtol=1e-4)

    # Text: the OpenAI file takes the BPE file next to it ... or named explicitly.
    (clip_files["openai"].parent / "bpe_simple_vocab_16e6.txt.gz").write_bytes(clip_files["bpe"].read_bytes())
    backbones = [text_backbone(clip_files["hf"]), text_backbone(clip_files["openai"]),
                 text_backbone(clip_files["jit"], tokenizer=str(clip_files["hf"]))]
    for backbone in backbones:
        text = backbone.build_processor(CONTEXT)(CAPTIONS)
        assert (text["input_ids"][:, 0] == len(backbone.build_processor(CONTEXT).tokenizer) - 2).all()  # <|startoftext|>
        with torch.no_grad():
            tokens, eos = reference.encode_text(text["input_ids"])
            output = backbone(text)
        torch.testing.assert_close(output.sentence, eos, atol=1e-5, rtol=1e-4)
        real = text["attention_mask"].bool()
        torch.testing.assert_close(output.tokens[real], tokens[real], atol=1e-5, rtol=1e-4)
    assert backbones[0].hidden_size == EMBED and backbones[0].max_positions == CONTEXT


def test_clip_image_backbone_surface(clip_files):
    backbone = image_backbone(clip_files["hf"], size=(48, 16))
    assert backbone.mean == CLIP_MEAN and backbone.has_cls_token and not backbone.can_rerun_stages
    assert [(s.channels, s.reduction) for s in backbone.stages] == [(EMBED, PATCH)]
    assert backbone.feature_map_sizes((48, 16)) == [(6, 2)]  # 384x128 at patch 16 -> 24x8, same rule
    assert backbone.feature_map_sizes((40, 40)) == [(5, 5)]  # another input size: resampled on the fly
    backbone.freeze_stages(1)
    assert not any(p.requires_grad for p in backbone.model.vision_model.embeddings.parameters())
    assert all(p.requires_grad for p in backbone.model.visual_projection.parameters())
    # pretrained=false keeps the folder's architecture (how a tbps checkpoint is rebuilt)
    random = create_image_backbone({"name": "clip", "weights": str(clip_files["hf"]), "pretrained": False}, image_size=(48, 16))
    assert {k: v.shape for k, v in random.state_dict().items()} == {k: v.shape for k, v in backbone.state_dict().items()}
    random.load_state_dict(backbone.state_dict())
    images = torch.randn(2, 3, 48, 16)
    with torch.no_grad():
        torch.testing.assert_close(random.eval()(images).cls_token, backbone(images).cls_token)
    # no weights, pretrained=false: CLIP ViT-B/16 (what the configs' feature-map check builds)
    default = create_image_backbone({"name": "clip", "pretrained": False}, image_size=(384, 128))
    assert default.stages[0].reduction == 16 and default.channels == [512] and default.grid == (24, 8)
    assert default.model.vision_model.embeddings.position_embedding.weight.shape == (1 + 24 * 8, 768)


def test_position_embedding_interpolation():
    weight = torch.randn(1 + 14 * 14, 8)
    assert resize_position_embedding(weight, (14, 14), (14, 14)) is weight  # identity at the pretrained grid
    resized = resize_position_embedding(weight, (14, 14), (24, 8))
    assert resized.shape == (1 + 24 * 8, 8)
    torch.testing.assert_close(resized[0], weight[0])  # the class position is kept
    bicubic = resize_position_embedding(weight, (14, 14), (24, 8), mode="bicubic")
    assert not torch.allclose(resized, bicubic)
    # a linear ramp along the rows stays a (sampled) ramp: bilinear with align_corners=False
    ramp = torch.cat([torch.zeros(1, 1), torch.arange(4.0).repeat_interleave(4).unsqueeze(1)])  # 4x4 grid, value = row
    rows = resize_position_embedding(ramp, (4, 4), (8, 2))[1:].reshape(8, 2)
    torch.testing.assert_close(rows[:, 0], torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]))
    with pytest.raises(ValueError, match="position_interpolation"):
        resize_position_embedding(weight, (14, 14), (24, 8), mode="nearest")
    with pytest.raises(ValueError, match="grid"):
        resize_position_embedding(weight, (12, 12), (24, 8))


def test_backbone_interpolates_at_build(clip_files):
    at_grid = image_backbone(clip_files["hf"])
    table = at_grid.model.vision_model.embeddings.position_embedding.weight
    torch.testing.assert_close(table, clip_files["reference"].visual.positional_embedding.detach())
    tall = image_backbone(clip_files["hf"], size=(48, 16), position_interpolation="bicubic")
    expected = resize_position_embedding(table.detach(), (GRID, GRID), (6, 2), mode="bicubic")
    torch.testing.assert_close(tall.model.vision_model.embeddings.position_embedding.weight.detach(), expected)


def test_torchscript_archive_is_read_without_running_it(clip_files, tmp_path):
    state = {"visual.conv1.weight": torch.randn(4, 3, 2, 2).half(), "visual.proj": torch.randn(5, 3),
             "transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4).bfloat16(), "logit_scale": torch.tensor(4.6)}
    scripted_archive(state, tmp_path / "archive.pt")
    read = read_torchscript_tensors(tmp_path / "archive.pt")
    trusted = torch.jit.load(str(tmp_path / "archive.pt")).state_dict()  # this test wrote it
    assert set(read) == set(trusted) == set(state)
    for key, value in state.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value)

    # An archive whose pickle names a callable is refused before anything is called.
    payload = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:
        archive.writestr("evil/data.pkl", payload)
        archive.writestr("evil/code/__torch__.py", "")
    with pytest.raises(NotClipModelError, match="refused global posix.system"):
        read_torchscript_tensors(tmp_path / "evil.pt")
    with pytest.raises(NotClipModelError, match="refused"):
        create_image_backbone({"name": "clip", "weights": str(tmp_path / "evil.pt")}, image_size=IMAGE)


def test_tokenizer_from_openai_bpe_file_matches_the_hf_one(clip_files):
    hf = text_backbone(clip_files["hf"]).build_processor(8)
    openai = text_backbone(clip_files["hf"], tokenizer=str(clip_files["bpe"])).build_processor(8)
    a, b = hf(CAPTIONS), openai(CAPTIONS)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    eos = len(hf.tokenizer) - 1
    # truncated to max_length with the end-of-text token kept (OpenAI's truncate=True)
    assert a["input_ids"].shape[1] == 8 and a["input_ids"][1, -1] == eos and a["attention_mask"][1].all()
    assert (a["input_ids"].gather(1, (a["attention_mask"].sum(1, keepdim=True) - 1)) == eos).all()
    again = pickle.loads(pickle.dumps(hf))  # processors run in data-loader workers
    assert torch.equal(again(CAPTIONS)["input_ids"], a["input_ids"])
    with pytest.raises(ValueError, match=f"at most {CONTEXT}"):
        text_backbone(clip_files["hf"]).build_processor(CONTEXT + 1)


def test_errors_name_the_option_to_set(clip_files, tmp_path):
    with pytest.raises(BackboneWeightsError, match="never downloads.*model.image_backbone.weights=/path"):
        create_image_backbone({"name": "clip"}, image_size=IMAGE)
    with pytest.raises(BackboneWeightsError, match="model.image_backbone.weights='/no/such/clip' does not exist"):
        create_image_backbone({"name": "clip", "weights": "/no/such/clip"}, image_size=IMAGE)
    with pytest.raises(BackboneWeightsError, match="model.text_backbone.weights"):
        create_text_backbone({"name": "clip", "weights": str(tmp_path / "missing")})
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(NotClipModelError, match="holds a 'bert' model, not CLIP.*model.image_backbone.weights"):
        create_image_backbone({"name": "clip", "weights": str(bert)}, image_size=IMAGE)
    torch.save({"conv1.weight": torch.zeros(2), "fc.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(NotClipModelError, match="not an OpenAI CLIP checkpoint"):
        create_image_backbone({"name": "clip", "weights": str(tmp_path / "resnet.pth")}, image_size=IMAGE)
    with pytest.raises(NotClipModelError, match="folder that holds it and its config.json"):
        create_image_backbone({"name": "clip", "weights": str(clip_files["hf"] / "model.safetensors")}, image_size=IMAGE)
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(2)}, tmp_path / "rn50.pt")
    with pytest.raises(NotClipModelError, match="ResNet CLIP"):
        create_image_backbone({"name": "clip", "weights": str(tmp_path / "rn50.pt")}, image_size=IMAGE)
    with pytest.raises(BackboneWeightsError, match="model.text_backbone.tokenizer"):  # OpenAI file, no BPE beside it
        create_text_backbone({"name": "clip", "weights": str(clip_files["jit"])})
    with pytest.raises(NotClipModelError, match="not CLIP's"):  # a BERT tokenizer is not CLIP's
        from tbps.text.tokenizers import default_text_model_path

        create_text_backbone({"name": "clip", "weights": str(clip_files["hf"]), "tokenizer": str(default_text_model_path())})
    # options a backbone does not have are refused, not ignored
    with pytest.raises(ValueError, match="no option 'position_interpolaton'"):
        create_image_backbone({"name": "clip", "weights": str(clip_files["hf"]), "position_interpolaton": "bicubic"}, image_size=IMAGE)
    with pytest.raises(ValueError, match="image backbone 'efficientnet_lite0' has no option 'position_interpolation'"):
        create_image_backbone({"name": "efficientnet_lite0", "pretrained": False, "position_interpolation": "bilinear"})
    with pytest.raises(ValueError, match="no last_stride"):
        create_image_backbone({"name": "clip", "weights": str(clip_files["hf"]), "last_stride": 1}, image_size=IMAGE)
    with pytest.raises(ValueError, match="contradicts"):
        create_image_backbone({"name": "clip", "weights": str(clip_files["hf"]), "hidden_act": "gelu"}, image_size=IMAGE)
    with pytest.raises(ValueError, match="text backbone 'clip' has no option"):
        create_text_backbone({"name": "clip", "weights": str(clip_files["hf"]), "max_length": 77})


def test_hidden_act_changes_an_openai_file(clip_files):
    images = torch.randn(1, 3, *IMAGE)
    with torch.no_grad():
        quick = image_backbone(clip_files["openai"])(images).cls_token
        gelu = image_backbone(clip_files["openai"], hidden_act="gelu")(images).cls_token
    assert not torch.allclose(quick, gelu)


# ============================================================================ 2. SDM and the CLIP method
def test_sdm_loss_matches_a_literal_reference():
    torch.manual_seed(0)
    image, text = torch.randn(6, 5), torch.randn(6, 5)
    pids, image_ids = torch.tensor([3, 1, 3, 2, 1, 3]), torch.tensor([0, 1, 0, 2, 3, 4])

    def reference(scale, with_images=False):
        total = 0.0
        for a, b in ((image, text), (text, image)):
            for i in range(6):
                logits = [scale * F.cosine_similarity(a[i], b[j], dim=0) for j in range(6)]
                p = torch.softmax(torch.stack(logits), 0)
                y = torch.tensor([(1.0 if image_ids[i] == image_ids[j] else 0.3) if pids[i] == pids[j] else 0.0
                                  for j in range(6)]) if with_images else (pids == pids[i]).float()
                q = y / y.sum()
                total = total + (p * (p.log() - (q + 1e-8).log())).sum() / 6
        return total

    torch.testing.assert_close(sdm_loss(image, text, pids, 50.0), reference(50.0))
    torch.testing.assert_close(sdm_loss(image, text, pids, 50.0, image_ids=image_ids), reference(50.0, True))
    scale = torch.tensor(10.0, requires_grad=True)
    sdm_loss(image, text, pids, scale).backward()
    assert scale.grad is not None and scale.grad != 0


def clip_method_config(clip_files, **overrides):
    config = {
        "image_backbone": {"name": "clip", "weights": str(clip_files["hf"])},
        "text_backbone": {"name": "clip", "weights": str(clip_files["hf"])},
        "max_text_length": CONTEXT,
    }
    config.update(overrides)
    return config


def test_clip_method_encodes_and_trains_with_sdm(clip_files):
    torch.manual_seed(0)
    method = create_method("clip", clip_method_config(clip_files), num_classes=3, image_size=(48, 16))
    processor = method.build_text_processor()
    batch = {"images": torch.randn(4, 3, 48, 16), "text": processor(CAPTIONS), "labels": LABELS,
             "image_ids": torch.tensor([0, 1, 2, 3])}
    assert method.image_mean_std == (CLIP_MEAN, method.image_backbone.std)
    assert method.logit_scale.item() == pytest.approx(50.0) and "log_logit_scale" in dict(method.named_buffers())
    groups = method.parameter_groups()
    assert {id(p) for p in method.identity.parameters()} <= {id(p) for p in groups["new"]}
    assert len(groups["backbone"]) == len(list(method.image_backbone.parameters())) + len(list(method.text_backbone.parameters()))
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-4)
    method.train()
    history = []
    for _ in range(20):
        losses = method(batch)
        assert set(losses) == {"sdm", "id"}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(sum(losses.values()).item())
    assert history[-1] < 0.2 * history[0]  # SDM starts near 20 at logit scale 50 on random features
    method.eval()
    with torch.no_grad():
        images, texts = method.encode_image(batch["images"]), method.encode_text(batch["text"])
        similarity = method.similarity(texts, images)
    assert images["global"].shape == texts["global"].shape == (4, EMBED) and similarity.shape == (4, 4)
    # every caption now ranks an image of its own person first on the training batch
    assert torch.equal(LABELS[similarity.argmax(dim=1)], LABELS), similarity


def test_clip_method_switches(clip_files):
    learnt = create_method("clip", clip_method_config(clip_files, learnable_temperature=True, temperature=0.05,
                                                      losses={"sdm": 1.0, "id": 0.0, "sdm_same_identity_weight": 0.3}),
                           num_classes=3, image_size=IMAGE)
    assert learnt.identity is None and learnt.logit_scale.item() == pytest.approx(20.0)
    assert any(p is learnt.log_logit_scale for p in learnt.parameter_groups()["new"])
    batch = {"images": torch.randn(4, 3, *IMAGE), "text": learnt.build_text_processor()(CAPTIONS), "labels": LABELS,
             "image_ids": torch.tensor([0, 1, 2, 3])}  # captions 0 and 2: one person, two images
    losses = learnt(batch)
    assert set(losses) == {"sdm"}
    losses["sdm"].backward()
    assert learnt.log_logit_scale.grad is not None
    learnt.eval()
    with torch.no_grad():  # the soft labels reach the loss
        images, texts = learnt.encode_image(batch["images"])["global"], learnt.encode_text(batch["text"])["global"]
        soft = sdm_loss(images, texts, LABELS, learnt.logit_scale, image_ids=batch["image_ids"], same_identity_weight=0.3)
        torch.testing.assert_close(learnt(batch)["sdm"], soft)
        assert not torch.allclose(soft, sdm_loss(images, texts, LABELS, learnt.logit_scale))
    del batch["image_ids"]
    with pytest.raises(KeyError, match="image_ids"):
        learnt(batch)
    with pytest.raises(ValueError, match="has none"):
        create_method("clip", clip_method_config(clip_files, image_backbone={"name": "efficientnet_lite0", "pretrained": False}),
                      num_classes=3, image_size=(64, 32))
    with pytest.raises(ValueError, match="temperature"):
        create_method("clip", clip_method_config(clip_files, temperature=0.001), num_classes=3, image_size=IMAGE)


def test_clip_configs_carry_irra_hyper_parameters():
    for dataset in ("cuhk-pedes", "icfg-pedes", "rstpreid"):
        config = load_config(f"clip/{dataset}", ["model.image_backbone.weights=/w/clip-vit-base-patch16"])
        assert config.method == "clip" and list(config.data.image_size) == [384, 128] and config.data.batch_size == 64
        assert config.optim.optimizer == "adam" and config.optim.lr * config.optim.backbone_lr_mult == pytest.approx(1e-5)
        assert config.optim.lr == pytest.approx(5e-5)  # x5 for the new layers
        assert config.optim.warmup_epochs == 5 and config.optim.scheduler == "cosine" and config.trainer.max_epochs == 60
        assert config.model.temperature == 0.02 and config.model.max_text_length == 77
        assert config.model.text_backbone.weights == "/w/clip-vit-base-patch16"  # follows the image backbone's
    synthetic = load_config("clip/synthetic")
    assert synthetic.trainer.max_epochs <= 10 and synthetic.data.root == "data/synthetic"
    for method in ("acsa", "isanet", "laip"):
        config = load_config(CONFIG_DIR / method / "clip-cuhk-pedes.yaml")
        assert config.method == method and config.model.image_backbone.name == "clip"


# ============================================================================ 4. the seed methods on CLIP
def test_seed_methods_take_the_clip_patch_map(clip_files):
    images = torch.randn(4, 3, 48, 16)
    clip_image = {"name": "clip", "weights": str(clip_files["hf"])}
    acsa = create_method("acsa", {"embed_dim": 16, "max_text_length": CONTEXT, "image_backbone": clip_image,
                                  "text_backbone": {"name": "clip", "weights": str(clip_files["hf"])},
                                  "phrases": {"max_phrases": 3, "max_length": 8}}, num_classes=3, image_size=(48, 16))
    isanet = create_method("isanet", {"global_dim": 16, "local_dim": 8, "max_text_length": CONTEXT, "image_backbone": clip_image,
                                      "text_backbone": {"name": "bilstm", "embedding_dim": 8, "hidden_size": 8, "min_count": 1},
                                      "rgl": {"chunk_size": 3, "theta_reduction": 8}, "ila": {"num_centres": 3, "reduction": 4}},
                           num_classes=3, image_size=(48, 16))
    isanet.fit_text(CAPTIONS)
    laip = create_method("laip", {"embed_dim": 16, "max_text_length": CONTEXT, "max_phrase_length": 8, "max_phrases": 2,
                                  "queue_size": 8, "text_layers": 3, "attention_layer": 1, "image_backbone": clip_image,
                                  "text_backbone": {"name": "minilm", "pretrained": False}, "cross_attention": {"heads": 4}},
                         num_classes=3, image_size=(48, 16))
    for method in (acsa, isanet, laip):
        batch = {"images": images, "text": method.build_text_processor()(CAPTIONS), "captions": CAPTIONS,
                 "labels": LABELS, "person_ids": LABELS + 100, "image_ids": torch.arange(4)}
        method.train()
        losses = method(batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        grad = method.image_backbone.model.vision_model.embeddings.patch_embedding.weight.grad
        assert grad is not None and grad.abs().sum() > 0, method.method_name
        method.eval()
        with torch.no_grad():
            assert method.encode_image(images)["global"].shape[0] == 4


def test_nafs_staircase_refuses_a_single_stage_backbone_and_runs_plain(clip_files):
    config = {"embed_dim": 16, "max_text_length": CONTEXT, "image_backbone": {"name": "clip", "weights": str(clip_files["hf"])},
              "text_backbone": {"name": "minilm", "pretrained": False}}
    with pytest.raises(ValueError, match="model.image_network=plain"):
        create_method("nafs", config, num_classes=3, image_size=(48, 16))
    nafs = create_method("nafs", {**config, "image_network": "plain"}, num_classes=3, image_size=(48, 16)).eval()
    with torch.no_grad():
        features = nafs.encode_image(torch.randn(2, 3, 48, 16))
    assert features["global"].shape == (2, 16) and features["local"].shape[:2] == (2, 1 + 2 + 3)


# ============================================================================ the stage API
@pytest.mark.parametrize("name, extra, size, reductions", [
    ("efficientnet_lite0", {}, (64, 32), [2, 4, 8, 16, 32]),
    ("efficientnet_lite0", {"last_stride": 1}, (64, 32), [2, 4, 8, 16, 16]),
    ("resnet50", {"last_stride": 1}, (64, 32), [4, 8, 16, 16]),
    ("swin_t", {}, (224, 224), [4, 8, 16, 32]),
])
def test_staged_backbones_describe_and_rerun_their_stages(name, extra, size, reductions):
    torch.manual_seed(0)
    backbone = create_image_backbone({"name": name, "pretrained": False, **extra}, image_size=size).eval()
    assert [s.reduction for s in backbone.stages] == reductions
    assert [s.channels for s in backbone.stages] == backbone.channels and backbone.can_rerun_stages
    assert not backbone.has_cls_token
    # measured map sizes agree with the stated reductions (these inputs divide evenly)
    assert backbone.feature_map_sizes(size) == [(size[0] // r, size[1] // r) for r in reductions]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, *size)).feature_maps
        for after in (-3, -2):
            tail = backbone.stage_tail(after).eval()
            torch.testing.assert_close(tail(maps[after]), maps[-1], atol=1e-5, rtol=1e-4)
            assert all(p.data_ptr() != q.data_ptr() for p in tail.parameters() for q in backbone.parameters())
    with pytest.raises(ValueError, match="last stage map"):
        backbone.stage_tail(-1)


@pytest.mark.slow
def test_clip_config_trains_through_the_engine_and_reloads(clip_files, tiny_synthetic, tmp_path):
    from tbps.engine.checkpoint import load_method
    from tbps.engine.train import train

    config = load_config("clip/synthetic", [
        f"data.root={tiny_synthetic}", "data.image_size=[48,16]", "data.batch_size=16", "data.eval_batch_size=64",
        "data.num_workers=0", f"model.image_backbone.weights={clip_files['hf']}", f"model.max_text_length={CONTEXT}",
        "model.image_backbone.freeze_stages=0", "model.text_backbone.freeze_layers=0", "trainer.max_epochs=1",
        f"trainer.output_dir={tmp_path}", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
    ])
    result = train(config)
    method, saved = load_method(result.last_checkpoint, expected_method="clip")
    assert saved["model"]["text_backbone"]["weights"] == str(clip_files["hf"])  # resolved from the image backbone's
    assert method.image_backbone.grid == (6, 2) and method.image_mean_std[0] == CLIP_MEAN
    assert result.report["checkpoints"]["last"]["epoch"] == 1
