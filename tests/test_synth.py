"""Tests for the built-in synthetic pedestrian benchmark (tbps.data.synth)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbps.data import synth

SMALL = dict(identities=12, image_size=(128, 56), images_per_identity=(2, 4), progress=False)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    root = tmp_path_factory.mktemp("synth") / "set"
    summary = synth.generate(root, seed=3, workers=2, **SMALL)
    records = json.loads((root / "reid_raw.json").read_text())
    return root, summary, records


# ---------------------------------------------------------------------------------------------
# An independent caption parser: it knows the English words, not the generator's tables, so it
# catches a caption that names a wrong colour, garment, length, sleeve or pattern.
# ---------------------------------------------------------------------------------------------

COLOURS = {c: c for c in ("black", "white", "grey", "red", "blue", "green", "yellow", "orange", "pink", "purple",
                          "brown", "beige", "blonde")} | {"gray": "grey"}
# phrase -> (attribute holding the type, expected value); multi-word phrases are matched first.
NOUNS = {
    "baseball cap": ("headwear", "cap"), "cap": ("headwear", "cap"), "hat": ("headwear", "hat"),
    "beanie": ("headwear", "beanie"),
    "sunglasses": ("glasses", "sunglasses"), "shades": ("glasses", "sunglasses"),
    "glasses": ("glasses", "glasses"), "spectacles": ("glasses", "glasses"),
    "t-shirt": ("upper_type", "t-shirt"), "tee": ("upper_type", "t-shirt"),
    "button-up shirt": ("upper_type", "shirt"), "shirt": ("upper_type", "shirt"),
    "jacket": ("upper_type", "jacket"), "coat": ("upper_type", "coat"), "overcoat": ("upper_type", "coat"),
    "hoodie": ("upper_type", "hoodie"), "hooded sweatshirt": ("upper_type", "hoodie"),
    "sweater": ("upper_type", "sweater"), "jumper": ("upper_type", "sweater"), "pullover": ("upper_type", "sweater"),
    "tank top": ("upper_type", "tank top"), "vest top": ("upper_type", "tank top"),
    "dress shoes": ("shoe_type", "leather shoes"), "dress": ("upper_type", "dress"),
    "trousers": ("lower_type", "trousers"), "pants": ("lower_type", "trousers"), "slacks": ("lower_type", "trousers"),
    "jeans": ("lower_type", "jeans"), "shorts": ("lower_type", "shorts"), "skirt": ("lower_type", "skirt"),
    "running shoes": ("shoe_type", "sneakers"), "sneakers": ("shoe_type", "sneakers"),
    "trainers": ("shoe_type", "sneakers"), "boots": ("shoe_type", "boots"), "sandals": ("shoe_type", "sandals"),
    "leather shoes": ("shoe_type", "leather shoes"), "high heels": ("shoe_type", "heels"),
    "heels": ("shoe_type", "heels"),
    "backpack": ("carried", "backpack"), "rucksack": ("carried", "backpack"), "handbag": ("carried", "handbag"),
    "purse": ("carried", "handbag"), "shoulder bag": ("carried", "shoulder bag"),
    "suitcase": ("carried", "suitcase"), "trolley case": ("carried", "suitcase"),
    "hair": ("hair", None),
}
COLOUR_OF = {"headwear": "headwear_colour", "upper_type": "upper_colour", "lower_type": "lower_colour",
             "shoe_type": "shoe_colour", "carried": "carried_colour", "hair": "hair_colour"}
HAIR_LENGTH = {"short": "short", "long": "long", "shoulder-length": "medium", "medium-length": "medium"}
GARMENT_LENGTH = {"short": "short", "mini": "short", "knee-length": "knee", "long": "long", "ankle-length": "long"}
SLEEVES = {"short-sleeved": "short", "long-sleeved": "long", "sleeveless": "sleeveless"}
PATTERNS = {"striped": "striped", "checked": "checked", "plaid": "checked", "checkered": "checked",
            "polka-dot": "dotted", "dotted": "dotted"}
MODIFIERS = set(COLOURS) | set(HAIR_LENGTH) | set(GARMENT_LENGTH) | set(SLEEVES) | set(PATTERNS) | {"rolling"}
MALE_WORDS = {"man", "guy", "gentleman", "male", "he", "his", "him"}
FEMALE_WORDS = {"woman", "lady", "female", "she", "her"}


def caption_errors(caption: str, attrs: dict, view: str) -> list[str]:
    """Every statement in ``caption`` that contradicts ``attrs`` (empty list = consistent)."""
    tokens = re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", caption.lower())
    errors: list[str] = []
    used: set[int] = set()
    phrases = sorted(NOUNS, key=lambda p: -len(p.split()))
    i = 0
    while i < len(tokens):
        match = next((p for p in phrases if tokens[i:i + len(p.split())] == p.split()), None)
        if match is None:
            i += 1
            continue
        slot, value = NOUNS[match]
        if value is not None and attrs[slot] != value:
            errors.append(f"'{match}' but {slot}={attrs[slot]}")
        if slot == "hair" and attrs["hair_length"] == "bald":
            errors.append("mentions hair of a bald person")
        if slot == "glasses" and view == "back":
            errors.append("glasses mentioned in a back view")
        # Walk back over the adjectives in front of the noun and check each one.
        j = i - 1
        while j >= 0 and tokens[j] in MODIFIERS:
            word = tokens[j]
            used.add(j)
            if word in COLOURS:
                key = COLOUR_OF.get(slot)
                if slot == "upper_type" and attrs["upper_type"] == "dress":
                    key = "upper_colour"
                if key is None or attrs[key] != COLOURS[word]:
                    errors.append(f"colour '{word}' on '{match}' but {key}={attrs.get(key) if key else None}")
            elif word in SLEEVES:
                if slot != "upper_type" or attrs["sleeve"] != SLEEVES[word]:
                    errors.append(f"'{word}' on '{match}' but sleeve={attrs['sleeve']}")
            elif word in PATTERNS:
                if slot != "upper_type" or attrs["upper_pattern"] != PATTERNS[word]:
                    errors.append(f"'{word}' on '{match}' but pattern={attrs['upper_pattern']}")
            elif word == "rolling":
                if match != "suitcase":
                    errors.append("'rolling' on a non-suitcase")
            elif slot == "hair":
                if word not in HAIR_LENGTH or attrs["hair_length"] != HAIR_LENGTH[word]:
                    errors.append(f"'{word} hair' but hair_length={attrs['hair_length']}")
            elif match in ("skirt", "dress"):
                if word not in GARMENT_LENGTH or attrs["lower_length"] != GARMENT_LENGTH[word]:
                    errors.append(f"'{word} {match}' but lower_length={attrs['lower_length']}")
            else:
                errors.append(f"length word '{word}' on '{match}'")
            j -= 1
        i += len(match.split())
    for k, tok in enumerate(tokens):
        if tok in COLOURS and k not in used:
            errors.append(f"colour '{tok}' not attached to an item")
    if "logo" in tokens and (attrs["upper_pattern"] != "logo" or view != "front"):
        errors.append("logo mentioned but not visible")
    if "bald" in tokens and attrs["hair_length"] != "bald":
        errors.append("'bald' but has hair")
    if MALE_WORDS & set(tokens) and attrs["gender"] != "male":
        errors.append("male words for a woman")
    if FEMALE_WORDS & set(tokens) and attrs["gender"] != "female":
        errors.append("female words for a man")
    return errors


def test_parser_catches_wrong_statements() -> None:
    attrs = {"gender": "female", "hair_length": "long", "hair_colour": "black", "headwear": "none",
             "headwear_colour": None, "glasses": "none", "upper_type": "t-shirt", "sleeve": "short",
             "upper_colour": "red", "upper_pattern": "striped", "lower_type": "jeans", "lower_length": "long",
             "lower_colour": "blue", "shoe_type": "sneakers", "shoe_colour": "white", "carried": "backpack",
             "carried_colour": "black"}
    good = ("A woman with long black hair is wearing a red striped t-shirt, blue jeans and white sneakers, "
            "she carries a black backpack.")
    assert caption_errors(good, attrs, "front") == []
    for bad in (good.replace("white sneakers", "black sneakers"), good.replace("backpack", "handbag"),
                good.replace("long black", "short black"), good.replace("striped", "checked"),
                good.replace("woman", "man"), good + " She wears glasses.", good.replace("jeans", "trousers"),
                good + " The bag is green."):
        assert caption_errors(bad, attrs, "front"), bad


# ---------------------------------------------------------------------------------------------


def test_generate_summary_and_files(small_set: tuple[Path, dict, list[dict]]) -> None:
    root, summary, records = small_set
    assert summary["identities"] == 12
    assert summary["images"] == len(records) == sum(s["images"] for s in summary["splits"].values())
    assert summary["annotation_file"] == str(root / "reid_raw.json")
    assert summary["seconds"] > 0
    assert summary["captions"] == sum(len(r["captions"]) for r in records)
    files = sorted((root / "imgs" / "synth").iterdir())
    assert len(files) == len(records)
    for rec in records:
        assert set(rec) == {"split", "captions", "file_path", "processed_tokens", "id", "attributes", "view"}
        assert re.fullmatch(r"synth/\d{5}_\d{2}\.jpg", rec["file_path"])
        assert rec["view"] in ("front", "back", "side")
        with Image.open(root / "imgs" / rec["file_path"]) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (56, 128)  # PIL reports (width, height)


def test_splits_are_identity_disjoint_and_ids_contiguous(small_set: tuple[Path, dict, list[dict]]) -> None:
    _, summary, records = small_set
    split_of: dict[int, str] = {}
    for rec in records:
        assert split_of.setdefault(rec["id"], rec["split"]) == rec["split"]
        assert len(rec["captions"]) >= 2
        assert len(rec["processed_tokens"]) == len(rec["captions"])
    ids = sorted(split_of)
    assert ids == list(range(1, 13))
    order = {"train": 0, "val": 1, "test": 2}
    assert [order[split_of[i]] for i in ids] == sorted(order[split_of[i]] for i in ids)
    counts = {s: sum(1 for v in split_of.values() if v == s) for s in order}
    assert counts == {"train": 8, "val": 1, "test": 3}  # round(0.7*12), round(0.1*12), rest
    assert {s: v["identities"] for s, v in summary["splits"].items()} == counts
    # Several views of every identity with more than one image.
    for pid in ids:
        views = {r["view"] for r in records if r["id"] == pid}
        n = sum(1 for r in records if r["id"] == pid)
        assert len(views) == min(n, 3)


def test_tokens_match_captions(small_set: tuple[Path, dict, list[dict]]) -> None:
    _, _, records = small_set
    for rec in records:
        for caption, tokens in zip(rec["captions"], rec["processed_tokens"]):
            assert tokens == [t for t in re.findall(r"[a-z0-9'-]+", caption.lower()) if t.strip("-'")]
            assert all(t == t.lower() for t in tokens)


def test_determinism_independent_of_workers(small_set: tuple[Path, dict, list[dict]], tmp_path: Path) -> None:
    root, _, _ = small_set
    again = tmp_path / "again"
    synth.generate(again, seed=3, workers=1, **SMALL)
    assert (again / "reid_raw.json").read_bytes() == (root / "reid_raw.json").read_bytes()
    for path in sorted((root / "imgs" / "synth").iterdir()):
        assert (again / "imgs" / "synth" / path.name).read_bytes() == path.read_bytes(), path.name

    other = tmp_path / "other"
    synth.generate(other, seed=4, workers=1, **SMALL)
    assert (other / "reid_raw.json").read_bytes() != (root / "reid_raw.json").read_bytes()
    first = "00001_00.jpg"
    assert (other / "imgs" / "synth" / first).read_bytes() != (root / "imgs" / "synth" / first).read_bytes()


def test_captions_agree_with_attributes(small_set: tuple[Path, dict, list[dict]]) -> None:
    _, _, records = small_set
    for rec in records:
        for caption in rec["captions"]:
            assert caption_errors(caption, rec["attributes"], rec["view"]) == [], caption


def test_caption_generator_over_many_identities() -> None:
    """No rendering: exercise every attribute value and view against the independent parser."""
    people = synth.sample_identities(300, seed=11)
    lengths = []
    seen_values: set[tuple[str, object]] = set()
    for pid, (_, attrs) in enumerate(people):
        seen_values.update(attrs.items())
        for k, view in enumerate(synth.VIEWS):
            captions = synth.make_captions(attrs, view, np.random.default_rng([11, pid, k]), 3)
            assert len(captions) == 3 and len(set(captions)) == 3
            for caption in captions:
                assert caption_errors(caption, attrs, view) == [], (caption, attrs, view)
                assert caption[0].isupper() and caption.endswith(".")
                lengths.append(len(synth.tokenize(caption)))
    lengths_arr = np.array(lengths)
    assert lengths_arr.min() >= 8 and lengths_arr.max() <= 60
    assert np.mean((lengths_arr >= 15) & (lengths_arr <= 50)) > 0.9
    # The sample covers the grammar (every garment, shoe and bag type shows up).
    for key in ("upper_type", "lower_type", "shoe_type", "carried", "headwear", "upper_pattern", "glasses"):
        values = {v for k, v in seen_values if k == key}
        assert len(values) >= 3, (key, values)


def test_captions_vary_and_leave_attributes_out() -> None:
    attrs = synth.sample_identities(1, seed=5)[0][1]
    captions = synth.make_captions(attrs, "front", np.random.default_rng(0), 40)
    assert len(set(captions)) == 40
    # Varied templates / orderings: many different first three words and at least one caption
    # without the shoes (annotators skip attributes).
    assert len({" ".join(synth.tokenize(c)[:3]) for c in captions}) >= 5
    assert any(attrs["shoe_colour"] not in synth.tokenize(c) and "shoes" not in c and "sneakers" not in c
               and "boots" not in c and "sandals" not in c and "heels" not in c and "trainers" not in c
               for c in captions)


def test_identities_unique_with_hard_negatives_and_plausible() -> None:
    people = synth.sample_identities(400, seed=2)
    attrs_list = [a for _, a in people]
    signatures = {tuple(a[k] for k in synth.DESCRIBED_ATTRIBUTES) for a in attrs_list}
    assert len(signatures) == len(attrs_list)
    close_pairs = 0
    for (_, a), (_, b) in itertools.pairwise(people):  # siblings are adjacent in id order
        close_pairs += synth.attribute_distance(a, b) <= 2
    assert close_pairs > len(people) / 3
    for a in attrs_list:
        assert list(a) == list(synth.ATTRIBUTE_KEYS)
        if a["upper_type"] == "dress":
            assert a["lower_type"] == "none" and a["lower_colour"] is None
        else:
            assert a["lower_type"] != "none" and a["lower_colour"] is not None
        if a["upper_type"] == "coat":
            assert a["shoe_type"] != "sandals"
        if a["gender"] == "male":
            assert a["upper_type"] != "dress" and a["lower_type"] != "skirt" and a["shoe_type"] != "heels"
        assert (a["hair_colour"] is None) == (a["hair_length"] == "bald")
        assert (a["headwear_colour"] is None) == (a["headwear"] == "none")
        assert (a["carried_colour"] is None) == (a["carried"] == "none")
        if a["lower_type"] in ("trousers", "jeans"):
            assert a["lower_length"] == "long"


def test_small_set_has_hard_negatives(small_set: tuple[Path, dict, list[dict]]) -> None:
    _, _, records = small_set
    by_id = {r["id"]: r["attributes"] for r in records}
    pairs = list(itertools.combinations(by_id.values(), 2))
    assert len({json.dumps(a, sort_keys=True) for a in by_id.values()}) == len(by_id)
    assert min(synth.attribute_distance(a, b) for a, b in pairs) <= 2
    assert all(synth.attribute_distance(a, b) >= 1 for a, b in pairs)


def test_existing_set_requires_overwrite(small_set: tuple[Path, dict, list[dict]], tmp_path: Path) -> None:
    root, _, _ = small_set
    with pytest.raises(FileExistsError, match="overwrite"):
        synth.generate(root, seed=3, workers=1, **SMALL)
    # overwrite=True regenerates and leaves no stale images of the bigger earlier set.
    target = tmp_path / "reuse"
    synth.generate(target, seed=0, workers=1, **SMALL)
    smaller = dict(SMALL, identities=3)
    summary = synth.generate(target, seed=0, workers=1, overwrite=True, **smaller)
    assert len(list((target / "imgs" / "synth").iterdir())) == summary["images"]
    assert len(json.loads((target / "reid_raw.json").read_text())) == summary["images"]


def test_render_size_and_views_differ() -> None:
    attrs = synth.sample_identities(1, seed=9)[0][1]
    images = {v: np.asarray(synth.render_person_image(attrs, v, np.random.default_rng(1), (96, 48)))
              for v in synth.VIEWS}
    for arr in images.values():
        assert arr.shape == (96, 48, 3) and arr.dtype == np.uint8
        assert arr.std() > 10  # not a blank canvas
    again = np.asarray(synth.render_person_image(attrs, "front", np.random.default_rng(1), (96, 48)))
    assert np.array_equal(again, images["front"])


def test_contact_sheet(small_set: tuple[Path, dict, list[dict]], tmp_path: Path) -> None:
    root, _, _ = small_set
    out = synth.contact_sheet(root, tmp_path / "sheet.png", n=4, columns=2)
    assert out == tmp_path / "sheet.png"
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.width == 2 * (56 * synth.SHEET_SCALE + 2 * synth.SHEET_PAD)
        assert sheet.height > 2 * 128 * synth.SHEET_SCALE
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "a", identities=4, split_fractions=(0.5, 0.5, 0.5), progress=False)
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "b", identities=4, images_per_identity=(0, 2), progress=False)
    assert not (tmp_path / "a" / "reid_raw.json").exists()
