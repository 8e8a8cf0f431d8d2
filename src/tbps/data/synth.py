"""Built-in synthetic pedestrian benchmark (the project's offline default dataset).

``generate`` draws identities from a small attribute grammar, renders several camera views of
each one with PIL and writes everything in the CUHK-PEDES layout, so the same reader serves the
real benchmark and this one::

    <out_dir>/reid_raw.json        list of {split, captions, file_path, processed_tokens, id,
                                            attributes, view}
    <out_dir>/imgs/synth/PPPPP_KK.jpg

Difficulty comes from "families" of identities that differ in only one or two attributes (hard
negatives), viewpoint changes, clutter, occlusion, colour casts, blur, noise and captions that
leave attributes out. All knobs live in :class:`SynthStyle`.

Every image is a pure function of ``(seed, person id, image index)``, so output is byte-identical
for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from tbps.utils import atomic_write

__all__ = [
    "ANNOTATION_FILE",
    "ATTRIBUTE_KEYS",
    "VIEWS",
    "DEFAULT_STYLE",
    "DESCRIBED_ATTRIBUTES",
    "SynthStyle",
    "attribute_distance",
    "contact_sheet",
    "generate",
    "make_captions",
    "render_person_image",
    "sample_identities",
    "tokenize",
]

ANNOTATION_FILE = "reid_raw.json"
IMAGE_SUBDIR = "synth"
JPEG_QUALITY = 92


@dataclass(frozen=True)
class SynthStyle:
    """Difficulty knobs of the benchmark; ``DEFAULT_STYLE`` is what ``generate`` uses."""

    family_size: tuple[int, int] = (2, 4)  # identities per family (base + siblings), inclusive
    sibling_mutations: tuple[int, int] = (1, 2)  # attributes changed per sibling, inclusive
    occlusion_prob: float = 0.3  # chance of a pole / box / passer-by covering part of the body
    noise_sigma: tuple[float, float] = (1.5, 7.0)  # Gaussian pixel noise, 0-255 scale
    blur_prob: float = 0.5
    blur_radius: tuple[float, float] = (0.3, 1.0)  # in output pixels
    colour_cast: float = 0.07  # std of the per-channel gain
    brightness: tuple[float, float] = (0.7, 1.2)
    shade_jitter: float = 0.07  # per-image brightness jitter of each garment colour
    caption_drop_prob: float = 0.3  # chance an annotator leaves a given attribute out
    view_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)  # front, back, side
    person_height: tuple[float, float] = (0.76, 0.94)  # fraction of image height
    clutter_shapes: tuple[int, int] = (2, 7)
    supersample: int = 2  # draw at this multiple of the output size, then downsample (anti-aliasing)


DEFAULT_STYLE = SynthStyle()
VIEWS = ("front", "back", "side")

# ----------------------------------------------------------------------------------------------
# Attribute grammar
# ----------------------------------------------------------------------------------------------

ATTRIBUTE_KEYS: tuple[str, ...] = (
    "gender", "skin_tone", "hair_length", "hair_colour", "headwear", "headwear_colour", "glasses",
    "upper_type", "sleeve", "upper_colour", "upper_pattern", "lower_type", "lower_length",
    "lower_colour", "shoe_type", "shoe_colour", "carried", "carried_colour",
)
# Skin tone is rendered but never written in captions, so it must not be what tells two
# identities apart: uniqueness and hard-negative distance use the described attributes only.
DESCRIBED_ATTRIBUTES: tuple[str, ...] = tuple(k for k in ATTRIBUTE_KEYS if k != "skin_tone")

ALL_COLOURS = ("black", "white", "grey", "red", "blue", "green", "yellow", "orange", "pink",
               "purple", "brown", "beige")
_UNIFORM_COLOURS = {c: 1.0 for c in ALL_COLOURS}

Options = dict[Any, float]


def _opt_gender(a: dict) -> Options:
    return {"male": 0.5, "female": 0.5}


def _opt_skin(a: dict) -> Options:
    return {"light": 0.35, "medium": 0.3, "tan": 0.2, "dark": 0.15}


def _opt_hair_length(a: dict) -> Options:
    if a["gender"] == "male":
        return {"short": 0.7, "medium": 0.12, "long": 0.06, "bald": 0.12}
    return {"short": 0.15, "medium": 0.3, "long": 0.55}


def _opt_hair_colour(a: dict) -> Options:
    if a["hair_length"] == "bald":
        return {None: 1.0}
    return {"black": 0.38, "brown": 0.3, "blonde": 0.15, "grey": 0.09, "red": 0.08}


def _opt_headwear(a: dict) -> Options:
    return {"none": 0.6, "cap": 0.16, "hat": 0.1, "beanie": 0.14}


def _opt_headwear_colour(a: dict) -> Options:
    if a["headwear"] == "none":
        return {None: 1.0}
    return {c: 1.0 for c in ("black", "white", "grey", "red", "blue", "green", "yellow", "pink",
                             "brown", "beige", "purple", "orange")}


def _opt_glasses(a: dict) -> Options:
    return {"none": 0.66, "glasses": 0.22, "sunglasses": 0.12}


def _opt_upper_type(a: dict) -> Options:
    if a["gender"] == "male":
        return {"t-shirt": 0.26, "shirt": 0.18, "jacket": 0.18, "coat": 0.1, "hoodie": 0.12,
                "sweater": 0.1, "tank top": 0.06}
    return {"t-shirt": 0.2, "shirt": 0.13, "jacket": 0.14, "coat": 0.1, "hoodie": 0.08,
            "sweater": 0.1, "tank top": 0.06, "dress": 0.19}


def _opt_sleeve(a: dict) -> Options:
    return {
        "t-shirt": {"short": 0.85, "long": 0.15},
        "shirt": {"short": 0.4, "long": 0.6},
        "tank top": {"sleeveless": 1.0},
        "dress": {"sleeveless": 0.35, "short": 0.4, "long": 0.25},
    }.get(a["upper_type"], {"long": 1.0})


def _opt_upper_colour(a: dict) -> Options:
    return dict(_UNIFORM_COLOURS)


def _opt_upper_pattern(a: dict) -> Options:
    return {
        "t-shirt": {"plain": 0.5, "striped": 0.2, "logo": 0.22, "dotted": 0.08},
        "shirt": {"plain": 0.45, "striped": 0.2, "checked": 0.27, "dotted": 0.08},
        "jacket": {"plain": 0.75, "checked": 0.1, "logo": 0.15},
        "coat": {"plain": 0.8, "checked": 0.2},
        "hoodie": {"plain": 0.55, "logo": 0.3, "striped": 0.15},
        "sweater": {"plain": 0.55, "striped": 0.3, "logo": 0.15},
        "tank top": {"plain": 0.6, "striped": 0.25, "logo": 0.15},
        "dress": {"plain": 0.5, "striped": 0.15, "checked": 0.15, "dotted": 0.2},
    }[a["upper_type"]]


def _opt_lower_type(a: dict) -> Options:
    if a["upper_type"] == "dress":  # a dress is the lower garment too
        return {"none": 1.0}
    if a["gender"] == "male":
        return {"trousers": 0.45, "jeans": 0.4, "shorts": 0.15}
    return {"trousers": 0.3, "jeans": 0.32, "shorts": 0.14, "skirt": 0.24}


def _opt_lower_length(a: dict) -> Options:
    # For a dress this is the dress length (the hem is drawn where a skirt's would be).
    if a["lower_type"] in ("skirt", "none"):
        return {"short": 0.35, "knee": 0.4, "long": 0.25}
    if a["lower_type"] == "shorts":
        return {"short": 1.0}
    return {"long": 1.0}


def _opt_lower_colour(a: dict) -> Options:
    if a["lower_type"] == "none":
        return {None: 1.0}
    if a["lower_type"] == "jeans":
        return {"blue": 0.6, "black": 0.2, "grey": 0.15, "white": 0.05}
    if a["lower_type"] == "trousers":
        return {"black": 0.28, "grey": 0.2, "beige": 0.15, "brown": 0.1, "blue": 0.14, "white": 0.05,
                "green": 0.05, "red": 0.03}
    return dict(_UNIFORM_COLOURS)


def _opt_shoe_type(a: dict) -> Options:
    opts = {"sneakers": 0.45, "boots": 0.2, "leather shoes": 0.23, "sandals": 0.12}
    if a["gender"] == "female":
        opts = {"sneakers": 0.38, "boots": 0.2, "leather shoes": 0.1, "sandals": 0.12, "heels": 0.2}
    warm_weather = a["upper_type"] in ("t-shirt", "tank top", "dress") or a["lower_type"] in ("shorts", "skirt")
    if not warm_weather or a["upper_type"] == "coat":
        opts.pop("sandals")
    return opts


def _opt_shoe_colour(a: dict) -> Options:
    return {
        "leather shoes": {"black": 0.6, "brown": 0.4},
        "heels": {"black": 0.35, "red": 0.2, "beige": 0.2, "white": 0.15, "pink": 0.1},
        "boots": {"black": 0.4, "brown": 0.35, "beige": 0.15, "grey": 0.1},
        "sandals": {"black": 0.3, "brown": 0.35, "beige": 0.2, "white": 0.15},
        "sneakers": {"white": 0.36, "black": 0.2, "grey": 0.12, "blue": 0.1, "red": 0.08, "green": 0.05,
                     "yellow": 0.04, "pink": 0.05},
    }[a["shoe_type"]]


def _opt_carried(a: dict) -> Options:
    if a["gender"] == "male":
        return {"none": 0.3, "backpack": 0.32, "handbag": 0.03, "shoulder bag": 0.2, "suitcase": 0.15}
    return {"none": 0.25, "backpack": 0.2, "handbag": 0.3, "shoulder bag": 0.12, "suitcase": 0.13}


def _opt_carried_colour(a: dict) -> Options:
    if a["carried"] == "none":
        return {None: 1.0}
    return {"black": 0.22, "brown": 0.12, "grey": 0.1, "blue": 0.1, "red": 0.1, "green": 0.07,
            "beige": 0.06, "pink": 0.06, "white": 0.05, "yellow": 0.05, "purple": 0.04, "orange": 0.03}


# Sampled in this order; each option function only looks at earlier attributes.
_GRAMMAR: tuple[tuple[str, Callable[[dict], Options]], ...] = (
    ("gender", _opt_gender), ("skin_tone", _opt_skin), ("hair_length", _opt_hair_length),
    ("hair_colour", _opt_hair_colour), ("headwear", _opt_headwear),
    ("headwear_colour", _opt_headwear_colour), ("glasses", _opt_glasses),
    ("upper_type", _opt_upper_type), ("sleeve", _opt_sleeve), ("upper_colour", _opt_upper_colour),
    ("upper_pattern", _opt_upper_pattern), ("lower_type", _opt_lower_type),
    ("lower_length", _opt_lower_length), ("lower_colour", _opt_lower_colour),
    ("shoe_type", _opt_shoe_type), ("shoe_colour", _opt_shoe_colour), ("carried", _opt_carried),
    ("carried_colour", _opt_carried_colour),
)
assert tuple(k for k, _ in _GRAMMAR) == ATTRIBUTE_KEYS
_GRAMMAR_OPTIONS = dict(_GRAMMAR)

# Which attributes a sibling may change, weighted towards small details (shoes, glasses, bags)
# because those are what a global-only embedding tends to miss.
_MUTATION_WEIGHTS: dict[str, float] = {
    "hair_colour": 0.9, "hair_length": 0.6, "headwear": 1.0, "headwear_colour": 0.8, "glasses": 1.5,
    "upper_type": 0.6, "sleeve": 0.6, "upper_colour": 0.8, "upper_pattern": 1.2, "lower_type": 0.6,
    "lower_colour": 0.9, "shoe_type": 0.8, "shoe_colour": 1.5, "carried": 1.3, "carried_colour": 1.3,
}


def _pick(rng: np.random.Generator, options: Options, exclude: Any = "\0") -> Any:
    keys = [k for k in options if k != exclude]
    if not keys:
        raise ValueError("no option left to pick")
    weights = np.array([options[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


def _complete(attrs: dict, rng: np.random.Generator) -> dict:
    """Fill missing attributes and resample any that became implausible (in grammar order)."""
    for key, options_of in _GRAMMAR:
        options = options_of(attrs)
        if key not in attrs or attrs[key] not in options:
            attrs[key] = _pick(rng, options)
    return {k: attrs[k] for k in ATTRIBUTE_KEYS}


def _signature(attrs: dict) -> tuple:
    return tuple(attrs[k] for k in DESCRIBED_ATTRIBUTES)


def attribute_distance(a: dict, b: dict) -> int:
    """Number of described attributes in which two identities differ."""
    return sum(a[k] != b[k] for k in DESCRIBED_ATTRIBUTES)


def _mutate(base: dict, n_changes: int, rng: np.random.Generator) -> dict:
    attrs = dict(base)
    for _ in range(n_changes):
        keys = [k for k in _MUTATION_WEIGHTS if len(_GRAMMAR_OPTIONS[k](attrs)) > 1]
        key = _pick(rng, {k: _MUTATION_WEIGHTS[k] for k in keys})
        attrs[key] = _pick(rng, _GRAMMAR_OPTIONS[key](attrs), exclude=attrs[key])
        attrs = _complete(attrs, rng)
    return attrs



def _split_counts(identities: int, fractions: Sequence[float]) -> list[tuple[str, int]]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {fractions}")
    n_train = int(round(fractions[0] * identities))
    n_val = min(int(round(fractions[1] * identities)), identities - n_train)
    return [("train", n_train), ("val", n_val), ("test", identities - n_train - n_val)]


def sample_identities(identities: int, seed: int = 0, split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
                      style: SynthStyle = DEFAULT_STYLE) -> list[tuple[str, dict]]:
    """Return ``(split, attributes)`` per identity, in id order (train, val, test).

    Identities come in families (a random base plus siblings that differ from it in one or two
    attributes); a family never straddles two splits, so hard negatives meet at test time.
    """
    if identities < 1:
        raise ValueError("identities must be >= 1")
    rng = np.random.default_rng([seed, 0x5E7])
    seen: set[tuple] = set()
    out: list[tuple[str, dict]] = []
    lo_fam, hi_fam = style.family_size
    lo_mut, hi_mut = style.sibling_mutations
    for split, count in _split_counts(identities, split_fractions):
        made = 0
        while made < count:
            size = min(int(rng.integers(lo_fam, hi_fam + 1)), count - made)
            base = _complete({}, rng)
            while _signature(base) in seen:
                base = _complete({}, rng)
            family = [base]
            seen.add(_signature(base))
            attempts = 0
            while len(family) < size and attempts < 50 * size:
                attempts += 1
                sibling = _mutate(base, int(rng.integers(lo_mut, hi_mut + 1)), rng)
                # A mutation can cascade (a dress drops the trousers); keep siblings truly close.
                if attribute_distance(sibling, base) <= max(2, hi_mut) and _signature(sibling) not in seen:
                    seen.add(_signature(sibling))
                    family.append(sibling)
            out.extend((split, attrs) for attrs in family)
            made += len(family)
    return out


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens, as in CUHK-PEDES ``processed_tokens``."""
    return _TOKEN_RE.findall(caption.lower())


_COLOUR_WORDS = {c: [c] for c in ALL_COLOURS} | {"grey": ["grey", "gray"]}
_HAIR_COLOUR_WORDS = {"black": ["black"], "brown": ["brown"], "blonde": ["blonde"], "grey": ["grey", "gray"],
                      "red": ["red"]}


def colour_words(attribute: str, colour: str) -> list[str]:
    """The words a caption may use for ``colour`` as the value of a ``*_colour`` attribute."""
    return (_HAIR_COLOUR_WORDS if attribute == "hair_colour" else _COLOUR_WORDS)[colour]


_HAIR_LENGTH_WORDS = {"short": ["short"], "medium": ["shoulder-length", "medium-length"], "long": ["long"]}
_UPPER_NOUNS = {"t-shirt": ["t-shirt", "tee"], "shirt": ["shirt", "button-up shirt"], "jacket": ["jacket"],
                "coat": ["coat", "overcoat"], "hoodie": ["hoodie", "hooded sweatshirt"],
                "sweater": ["sweater", "jumper", "pullover"], "tank top": ["tank top", "vest top"],
                "dress": ["dress"]}
_SLEEVE_WORDS = {"short": ["short-sleeved"], "long": ["long-sleeved"], "sleeveless": ["sleeveless"]}
_PATTERN_WORDS = {"striped": ["striped"], "checked": ["checked", "plaid", "checkered"],
                  "dotted": ["polka-dot", "dotted"]}
_LOGO_PHRASES = ["with a logo", "with a logo on the front", "with a printed logo"]
_LOWER_NOUNS = {"trousers": ["trousers", "pants", "slacks"], "jeans": ["jeans"], "shorts": ["shorts"],
                "skirt": ["skirt"]}
_SKIRT_LENGTH_WORDS = {"short": ["short", "mini"], "knee": ["knee-length"], "long": ["long", "ankle-length"]}
_SHOE_NOUNS = {"sneakers": ["sneakers", "trainers", "running shoes"], "boots": ["boots"],
               "leather shoes": ["leather shoes", "dress shoes"], "sandals": ["sandals"],
               "heels": ["heels", "high heels"]}
_HEADWEAR_NOUNS = {"cap": ["cap", "baseball cap"], "hat": ["hat"], "beanie": ["beanie"]}
_GLASSES_NPS = {"glasses": ["glasses", "a pair of glasses", "spectacles"], "sunglasses": ["sunglasses", "shades"]}
_BAG_NOUNS = {"backpack": ["backpack", "rucksack"], "handbag": ["handbag", "purse"],
              "shoulder bag": ["shoulder bag"], "suitcase": ["suitcase", "rolling suitcase", "trolley case"]}
# (finite verb phrase, participle / preposition) per carried item; "pulling" only fits a suitcase.
_BAG_VERBS = {
    "backpack": (["carries", "has", "is carrying", "is wearing"], ["carrying", "with", "wearing"]),
    "handbag": (["holds", "is holding", "carries", "is carrying"], ["holding", "carrying", "with"]),
    "shoulder bag": (["carries", "has", "is carrying"], ["carrying", "with"]),
    "suitcase": (["is pulling", "pulls", "is dragging", "is wheeling"], ["pulling", "dragging", "wheeling"]),
}
_SUBJECT_NOUNS = {"male": ["man", "guy", "gentleman", "male pedestrian"],
                  "female": ["woman", "lady", "female pedestrian"],
                  None: ["person", "pedestrian"]}
_VIEW_PHRASES = {"front": ["facing the camera", "walking towards the camera"],
                 "back": ["seen from behind", "walking away from the camera"],
                 "side": ["seen from the side", "walking sideways past the camera"]}


def _choice(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _noun_phrases(attrs: dict, view: str, rng: np.random.Generator) -> dict[str, Any]:
    """One wording of every visible attribute (slot -> phrase); the caller decides which to use."""
    colour = lambda name: _choice(rng, _COLOUR_WORDS[name])  # noqa: E731 - tiny local helper
    nps: dict[str, Any] = {}
    if attrs["hair_length"] == "bald":
        nps["hair"] = "a bald head"
    else:
        words = []
        if rng.random() < 0.85:
            words.append(_choice(rng, _HAIR_LENGTH_WORDS[attrs["hair_length"]]))
        if rng.random() < 0.85 or not words:
            words.append(_choice(rng, _HAIR_COLOUR_WORDS[attrs["hair_colour"]]))
        nps["hair"] = " ".join(words + ["hair"])
    if attrs["headwear"] != "none":
        nps["headwear"] = _a(f"{colour(attrs['headwear_colour'])} {_choice(rng, _HEADWEAR_NOUNS[attrs['headwear']])}")
    if attrs["glasses"] != "none" and view != "back":  # eyes are hidden from behind
        nps["glasses"] = _choice(rng, _GLASSES_NPS[attrs["glasses"]])

    upper = attrs["upper_type"]
    words = []
    if upper in ("t-shirt", "shirt", "dress") and rng.random() < 0.45:
        words.append(_choice(rng, _SLEEVE_WORDS[attrs["sleeve"]]))
    if upper == "dress" and rng.random() < 0.6:
        words.append(_choice(rng, _SKIRT_LENGTH_WORDS[attrs["lower_length"]]))
    words.append(colour(attrs["upper_colour"]))
    pattern = attrs["upper_pattern"]
    if pattern in _PATTERN_WORDS and rng.random() < 0.85:
        words.append(_choice(rng, _PATTERN_WORDS[pattern]))
    words.append(_choice(rng, _UPPER_NOUNS[upper]))
    # A chest logo is only visible from the front.
    if pattern == "logo" and view == "front" and rng.random() < 0.8:
        words.append(_choice(rng, _LOGO_PHRASES))
    nps["upper"] = _a(" ".join(words))

    lower = attrs["lower_type"]
    if lower != "none":
        words = []
        length = _choice(rng, _SKIRT_LENGTH_WORDS[attrs["lower_length"]]) if lower == "skirt" and rng.random() < 0.7 else ""
        # "a purple mini skirt" but "a short purple skirt": "mini" belongs next to the noun.
        words += [length, colour(attrs["lower_colour"])] if length != "mini" else [colour(attrs["lower_colour"]), length]
        words = [w for w in words if w] + [_choice(rng, _LOWER_NOUNS[lower])]
        phrase = " ".join(words)
        if lower == "skirt":
            phrase = _a(phrase)
        elif rng.random() < 0.3:
            phrase = "a pair of " + phrase
        nps["lower"] = phrase
    shoes = f"{colour(attrs['shoe_colour'])} {_choice(rng, _SHOE_NOUNS[attrs['shoe_type']])}"
    nps["shoes"] = ("a pair of " + shoes) if rng.random() < 0.25 else shoes

    carried = attrs["carried"]
    # From the front a backpack shows only as straps, so annotators often miss it.
    if carried != "none" and not (carried == "backpack" and view == "front" and rng.random() < 0.5):
        finite, participle = _BAG_VERBS[carried]
        noun = _a(f"{colour(attrs['carried_colour'])} {_choice(rng, _BAG_NOUNS[carried])}")
        nps["bag"] = (_choice(rng, finite), _choice(rng, participle), noun)
    return nps


def _render_caption(template: int, nps: dict[str, Any], keep: set[str], gender: str | None, view_phrase: str,
                    subject_words: list[str], wear_order: list[str]) -> str:
    """Assemble one caption from the kept noun phrases with one of several sentence templates."""
    subject_noun, article = subject_words
    subject = f"{article} {subject_noun}"
    pron = {"male": "he", "female": "she"}.get(gender or "", "the person")
    wear = [nps[s] for s in wear_order if s in keep and s in nps]
    hair = nps["hair"] if "hair" in keep else None
    bag = nps.get("bag") if "bag" in keep else None
    view = view_phrase if "view" in keep else None
    parts: list[str] = []
    if template == 0:
        s = subject + (f" with {hair}" if hair else "")
        s += f" is wearing {_join(wear)}" if wear else " is walking"
        if bag:
            s += f", {pron} {bag[0]} {bag[2]}"
        parts.append(s)
    elif template == 1:
        s = subject + (f" wearing {_join(wear)}" if wear else "") + (f" is {view}" if view else " walks by")
        parts.append(s)
        tail = []
        if hair:
            tail.append(f"has {hair}")
        if bag:
            tail.append(f"{bag[0]} {bag[2]}")
        if tail:
            parts.append(f"{pron} " + " and ".join(tail))
    elif template == 2:
        s = subject + (f" has {hair} and" if hair else "") + (f" is dressed in {_join(wear)}" if wear else " is walking")
        if bag:
            s += f", {bag[1]} {bag[2]}"
        parts.append(s)
    elif template == 3:
        s = subject + (f" {view}" if view else "")
        if wear:
            s += f", dressed in {_join(wear)}"
        if bag:
            s += f", {bag[1]} {bag[2]}"
        if hair:
            s += f", with {hair}"
        parts.append(s)
    else:
        s = subject + (f" in {_join(wear)}" if wear else "") + (f", {bag[1]} {bag[2]}" if bag else "")
        parts.append(s)
        if hair:
            parts.append(f"{pron} has {hair}")
        if view:
            parts.append(f"{pron} is {view}")
    sentences = [p[0].upper() + p[1:] for p in parts]
    return ". ".join(sentences) + "."


def make_captions(attrs: dict, view: str, rng: np.random.Generator, count: int,
                  drop_prob: float = DEFAULT_STYLE.caption_drop_prob) -> list[str]:
    """Write ``count`` distinct captions of one image, leaving attributes out at random.

    Every phrase is derived from the attributes (and the view), so a caption can omit an
    attribute but never contradict one.
    """
    captions: list[str] = []
    for _ in range(count * 10):
        if len(captions) == count:
            break
        nps = _noun_phrases(attrs, view, rng)
        gender = attrs["gender"] if rng.random() >= drop_prob * 0.5 else None
        subject_words = [_choice(rng, _SUBJECT_NOUNS[gender]), _choice(rng, ["A", "The", "This"])]
        top_down = ["headwear", "glasses", "upper", "lower", "shoes"]
        wear_order = top_down if rng.random() < 0.6 else [top_down[i] for i in rng.permutation(len(top_down))]
        template = int(rng.integers(5))
        optional = ["hair", "headwear", "glasses", "upper", "lower", "shoes", "bag", "view"]
        dropped = [s for s in optional if rng.random() < (drop_prob if s != "view" else 0.6)]
        if "upper" in dropped and "lower" in dropped:  # annotators always describe the clothes
            dropped.remove("upper")
        keep = set(optional) - set(dropped)
        view_phrase = _choice(rng, _VIEW_PHRASES[view])
        caption = _render_caption(template, nps, keep, gender, view_phrase, subject_words, wear_order)
        # Re-add dropped attributes until the caption reaches a typical annotator length.
        while len(tokenize(caption)) < 15 and dropped:
            keep.add(dropped.pop(0))
            caption = _render_caption(template, nps, keep, gender, view_phrase, subject_words, wear_order)
        while len(tokenize(caption)) > 50 and len(keep & {"view", "hair", "headwear", "glasses"}) > 0:
            keep.discard(next(s for s in ("view", "headwear", "glasses", "hair") if s in keep))
            caption = _render_caption(template, nps, keep, gender, view_phrase, subject_words, wear_order)
        if caption not in captions:
            captions.append(caption)
    return captions


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

RGB = tuple[int, int, int]
_COLOUR_RGB: dict[str, RGB] = {
    "black": (30, 30, 33), "white": (236, 236, 232), "grey": (128, 128, 132), "red": (196, 34, 40),
    "blue": (40, 82, 182), "green": (44, 132, 62), "yellow": (234, 202, 46), "orange": (238, 124, 32),
    "pink": (238, 146, 180), "purple": (114, 54, 146), "brown": (114, 72, 42), "beige": (214, 194, 152),
}
_DENIM_RGB: dict[str, RGB] = {"blue": (58, 88, 142), "black": (38, 40, 48), "grey": (112, 116, 126),
                              "white": (226, 229, 234)}
_HAIR_RGB: dict[str, RGB] = {"black": (26, 22, 20), "brown": (96, 60, 34), "blonde": (220, 188, 120),
                             "grey": (170, 170, 170), "red": (172, 74, 34)}
_SKIN_RGB: dict[str, RGB] = {"light": (242, 208, 182), "medium": (210, 164, 124), "tan": (172, 122, 82),
                             "dark": (112, 76, 52)}


def _scale(c: Sequence[float], f: float) -> RGB:
    # Hot path (tens of thousands of calls per batch), hence no generator; f is never negative.
    return (min(255, int(c[0] * f + 0.5)), min(255, int(c[1] * f + 0.5)), min(255, int(c[2] * f + 0.5)))


def _mix(c1: Sequence[float], c2: Sequence[float], t: float) -> RGB:
    return tuple(int(round(a * (1 - t) + b * t)) for a, b in zip(c1, c2))  # type: ignore[return-value]


def _luma(c: Sequence[float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _capsule(p0: tuple[float, float], p1: tuple[float, float], r0: float, r1: float, n: int = 5) -> list[tuple[float, float]]:
    """Polygon of a tapered limb segment with round ends."""
    ang = math.atan2(p1[1] - p0[1], p1[0] - p0[0])
    pts = [(p1[0] + r1 * math.cos(ang - math.pi / 2 + math.pi * i / n),
            p1[1] + r1 * math.sin(ang - math.pi / 2 + math.pi * i / n)) for i in range(n + 1)]
    pts += [(p0[0] + r0 * math.cos(ang + math.pi / 2 + math.pi * i / n),
             p0[1] + r0 * math.sin(ang + math.pi / 2 + math.pi * i / n)) for i in range(n + 1)]
    return pts


def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 2 * math.pi,
                 n: int = 16) -> list[tuple[float, float]]:
    return [(cx + rx * math.cos(a0 + (a1 - a0) * i / n), cy + ry * math.sin(a0 + (a1 - a0) * i / n))
            for i in range(n + 1)]


class _Painter:
    """Draws body-unit shapes (1 unit = head height, x right, y down from the top of the head).

    Shapes go straight onto the scene image. Side lighting is applied per shape (its fill is
    scaled by the light level at its centre), which is much cheaper than lighting a layer.
    """

    def __init__(self, img: Image.Image, unit: float, cx: float, top: float, mirror: int, light: int):
        self.img = img
        self.size = img.size
        self.draw = ImageDraw.Draw(img)
        self.u, self.cx, self.top, self.mirror, self.light = unit, cx, top, mirror, light
        self.edge = max(1, int(round(0.055 * unit)))
        self.pattern_mask: Image.Image | None = None
        self.pattern_colour: RGB = (0, 0, 0)

    def xy(self, pts: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(self.cx + self.mirror * x * self.u, self.top + y * self.u) for x, y in pts]

    def _lit(self, fill: Sequence[int], x_px: float) -> RGB:
        gain = 1.0 + 0.14 * self.light * (x_px - self.cx) / (1.2 * self.u)
        return _scale(fill, min(1.15, max(0.8, gain)))

    def poly(self, pts: Sequence[tuple[float, float]], fill: Sequence[int], outline: bool = True,
             patterned: bool = False) -> None:
        xy = self.xy(pts)
        x_mid = sum(x for x, _ in xy) / len(xy)
        colour = self._lit(fill, x_mid)
        self.draw.polygon(xy, fill=colour)
        if patterned and self.pattern_mask is not None:
            # Pattern only inside this shape: mask = shape AND canvas-wide pattern, on the bbox only.
            x0 = max(0, int(min(x for x, _ in xy)))
            y0 = max(0, int(min(y for _, y in xy)))
            x1 = min(self.size[0], int(math.ceil(max(x for x, _ in xy))) + 1)
            y1 = min(self.size[1], int(math.ceil(max(y for _, y in xy))) + 1)
            if x1 > x0 and y1 > y0:
                box = (x0, y0, x1, y1)
                mask = Image.new("L", (x1 - x0, y1 - y0), 0)
                ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in xy], fill=255)
                mask = ImageChops.multiply(mask, self.pattern_mask.crop(box))
                self.img.paste(self._lit(self.pattern_colour, x_mid), box, mask=mask)
        if outline:
            self.draw.line(xy + xy[:1], fill=_scale(colour, 0.6), width=self.edge, joint="curve")

    def limb(self, p0: tuple[float, float], p1: tuple[float, float], r0: float, r1: float, fill: Sequence[int],
             patterned: bool = False) -> None:
        """A limb with darker edges and a lit stripe, so arms and legs read as round."""
        self.poly(_capsule(p0, p1, r0, r1), _scale(fill, 0.8), outline=True, patterned=patterned)
        if patterned and self.pattern_mask is not None:
            return
        shift = 0.28 * self.light * self.mirror
        q0 = (p0[0] + shift * r0, p0[1])
        q1 = (p1[0] + shift * r1, p1[1])
        self.poly(_capsule(q0, q1, r0 * 0.55, r1 * 0.55), fill, outline=False)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: Sequence[int], outline: bool = True,
                patterned: bool = False) -> None:
        self.poly(_ellipse_pts(cx, cy, rx, ry), fill, outline=outline, patterned=patterned)

    def line(self, pts: Sequence[tuple[float, float]], fill: Sequence[int], width: float) -> None:
        xy = self.xy(pts)
        colour = self._lit(fill, sum(x for x, _ in xy) / len(xy))
        self.draw.line(xy, fill=colour, width=max(1, int(round(width * self.u))), joint="curve")

    def set_pattern(self, kind: str, colour: RGB) -> None:
        """Prepare a canvas-wide stripe/check/dot mask aligned to the body, shared by all garment parts."""
        if kind not in ("striped", "checked", "dotted"):
            self.pattern_mask = None
            return
        w, h = self.size
        mask = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(mask)
        u = self.u
        if kind == "striped":
            period, thick = 0.3 * u, max(1.0, 0.12 * u)
            y = self.top % period
            while y < h:
                d.rectangle([0, y, w, y + thick], fill=255)
                y += period
        elif kind == "checked":
            period, thick = 0.34 * u, max(1.0, 0.09 * u)
            y = self.top % period
            while y < h:
                d.rectangle([0, y, w, y + thick], fill=255)
                y += period
            x = self.cx % period
            while x < w:
                d.rectangle([x, 0, x + thick, h], fill=255)
                x += period
        else:
            period, r = 0.3 * u, max(1.0, 0.06 * u)
            for row, y in enumerate(np.arange(self.top % period, h, period)):
                off = period / 2 if row % 2 else 0.0
                for x in np.arange(off, w, period):
                    d.ellipse([x - r, y - r, x + r, y + r], fill=255)
        self.pattern_mask = mask
        self.pattern_colour = colour


def _person_colours(attrs: dict, rng: np.random.Generator, style: SynthStyle) -> dict[str, RGB]:
    jitter = lambda c: _scale(c, 1.0 + rng.normal(0.0, style.shade_jitter))  # noqa: E731
    upper = jitter(_COLOUR_RGB[attrs["upper_colour"]])
    if attrs["lower_type"] == "jeans":
        lower = jitter(_DENIM_RGB[attrs["lower_colour"]])
    elif attrs["lower_colour"] is not None:
        lower = jitter(_COLOUR_RGB[attrs["lower_colour"]])
    else:
        lower = upper
    pattern = _scale(upper, 0.5) if _luma(upper) > 150 else _mix(upper, (250, 250, 250), 0.6)
    return {
        "skin": jitter(_SKIN_RGB[attrs["skin_tone"]]),
        "hair": jitter(_HAIR_RGB[attrs["hair_colour"]]) if attrs["hair_colour"] else (0, 0, 0),
        "upper": upper,
        "pattern": pattern,
        "lower": lower,
        "shoe": jitter(_COLOUR_RGB[attrs["shoe_colour"]]),
        "headwear": jitter(_COLOUR_RGB[attrs["headwear_colour"]]) if attrs["headwear_colour"] else (0, 0, 0),
        "bag": jitter(_COLOUR_RGB[attrs["carried_colour"]]) if attrs["carried_colour"] else (0, 0, 0),
    }


@dataclass
class _Body:
    """Per-image body geometry in body units."""

    shoulder: float
    waist: float
    hip: float
    view: str
    arm_swing: float  # radians, positive = forwards (side) / outwards (front, back)
    arm_swing_other: float
    stride: float  # radians of thigh swing (side view)
    stance: float  # feet spread (front/back view)


_SHOULDER_Y, _WAIST_Y, _HIP_Y, _CROTCH_Y, _KNEE_Y, _ANKLE_Y = 1.32, 2.75, 3.5, 3.95, 5.35, 6.9
_HEM_Y = {"t-shirt": 3.55, "shirt": 3.6, "jacket": 3.65, "coat": 5.1, "hoodie": 3.65, "sweater": 3.6,
          "tank top": 3.5, "dress": _WAIST_Y}
_SKIRT_HEM_Y = {"short": 4.55, "knee": 5.35, "long": 6.65}


def _torso_outline(b: _Body, hem: float, flare: float = 0.0) -> list[tuple[float, float]]:
    if b.view == "side":
        front, back = 0.36, -0.34
        return [(-0.12, 1.05), (back + 0.05, 1.3), (back, 1.7), (back + 0.04, _WAIST_Y), (back - 0.02, _HIP_Y),
                (back - 0.02 - flare, hem), (front + 0.02 + flare, hem), (front, _HIP_Y), (front - 0.05, _WAIST_Y),
                (front + 0.04, 1.9), (front - 0.02, 1.4), (0.18, 1.1)]
    s, w, h = b.shoulder, b.waist, b.hip
    right = [(0.2, 1.08), (s - 0.12, 1.22), (s, 1.45), (s - 0.05, 1.9), (w, _WAIST_Y), (h, _HIP_Y),
             (max(h, w) + flare, hem)]
    return right + [(-x, y) for x, y in reversed(right)]


def _arm_points(b: _Body, near: bool) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """Shoulder, elbow and wrist of one arm."""
    upper, fore = 1.35, 1.2
    if b.view == "side":
        swing = b.arm_swing if near else b.arm_swing_other
        sh = (0.0, _SHOULDER_Y + 0.12)
        el = (sh[0] + upper * math.sin(swing), sh[1] + upper * math.cos(swing))
        bend = swing + 0.25 + 0.35 * max(0.0, swing)  # elbows bend forwards, more on the forward swing
        wr = (el[0] + fore * math.sin(bend), el[1] + fore * math.cos(bend))
        return sh, el, wr
    side = 1 if near else -1
    swing = b.arm_swing if near else b.arm_swing_other
    sh = (side * (b.shoulder - 0.14), _SHOULDER_Y + 0.15)
    el = (sh[0] + side * upper * math.sin(swing), sh[1] + upper * math.cos(swing))
    wr = (el[0] + side * fore * math.sin(swing * 0.6), el[1] + fore * math.cos(swing * 0.6))
    return sh, el, wr


def _leg_points(b: _Body, near: bool) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """Hip, knee and ankle of one leg."""
    if b.view == "side":
        hip = (0.0, 3.75)
        swing = b.stride if near else -b.stride
        thigh, shin = _KNEE_Y - 3.75, _ANKLE_Y - _KNEE_Y
        knee = (hip[0] + thigh * math.sin(swing), hip[1] + thigh * math.cos(swing))
        shin_angle = swing - (0.35 * b.stride if swing < 0 else 0.05)  # trailing knee bends
        ankle = (knee[0] + shin * math.sin(shin_angle), knee[1] + shin * math.cos(shin_angle))
        return hip, knee, ankle
    side = 1 if near else -1
    hip = (side * (b.hip - 0.36), 3.75)
    knee = (side * (b.hip - 0.38 + b.stance * 0.5), _KNEE_Y)
    ankle = (side * (b.hip - 0.4 + b.stance), _ANKLE_Y)
    return hip, knee, ankle


def _draw_shoe(p: _Painter, attrs: dict, c: dict[str, RGB], ankle: tuple[float, float], view: str, shade: float) -> None:
    kind = attrs["shoe_type"]
    shoe = _scale(c["shoe"], shade)
    skin = _scale(c["skin"], shade)
    ax, ay = ankle
    if view == "side":
        if kind == "boots":
            p.poly(_capsule((ax, ay - 0.45), (ax + 0.02, ay), 0.19, 0.19), shoe)
        if kind == "sandals":
            p.ellipse(ax + 0.12, ay + 0.12, 0.3, 0.11, skin)
            p.line([(ax - 0.05, ay + 0.02), (ax + 0.05, ay + 0.2)], shoe, 0.07)
            p.line([(ax + 0.2, ay + 0.06), (ax + 0.28, ay + 0.2)], shoe, 0.07)
            p.line([(ax - 0.17, ay + 0.24), (ax + 0.42, ay + 0.24)], shoe, 0.06)
            return
        if kind == "heels":
            p.ellipse(ax + 0.14, ay + 0.1, 0.27, 0.1, shoe)
            p.poly([(ax - 0.12, ay + 0.12), (ax - 0.04, ay + 0.12), (ax - 0.07, ay + 0.32), (ax - 0.11, ay + 0.32)], shoe)
            return
        p.ellipse(ax + 0.13, ay + 0.12, 0.33, 0.15, shoe)
        if kind == "sneakers":  # a white sole is what makes a sneaker look like one
            p.line([(ax - 0.16, ay + 0.23), (ax + 0.42, ay + 0.23)], (240, 240, 238), 0.07)
        return
    if kind == "boots":
        p.poly(_capsule((ax, ay - 0.45), (ax, ay), 0.2, 0.2), shoe)
    if kind == "sandals":
        p.ellipse(ax, ay + 0.12, 0.15, 0.15, skin)
        p.line([(ax - 0.15, ay + 0.05), (ax + 0.15, ay + 0.05)], shoe, 0.06)
        p.line([(ax - 0.15, ay + 0.17), (ax + 0.15, ay + 0.17)], shoe, 0.06)
        return
    if kind == "heels":
        p.ellipse(ax, ay + 0.06, 0.13, 0.1, skin)
        p.ellipse(ax, ay + 0.17, 0.15, 0.12, shoe)
        return
    p.ellipse(ax, ay + 0.12, 0.2, 0.16, shoe)
    if kind == "sneakers":
        p.line([(ax - 0.18, ay + 0.24), (ax + 0.18, ay + 0.24)], (240, 240, 238), 0.07)


def _draw_leg(p: _Painter, attrs: dict, c: dict[str, RGB], b: _Body, near: bool, shade: float) -> None:
    hip, knee, ankle = _leg_points(b, near)
    lower_type = attrs["lower_type"]
    skin, lower = _scale(c["skin"], shade), _scale(c["lower"], shade)
    if lower_type in ("trousers", "jeans"):
        p.limb(hip, knee, 0.34, 0.25, lower)
        p.limb(knee, ankle, 0.25, 0.2, lower)
        if lower_type == "jeans":  # light seam down the leg reads as denim
            p.line([knee, ankle], _mix(lower, (235, 235, 240), 0.35), 0.04)
    else:
        p.limb(hip, knee, 0.3, 0.2, skin)
        p.limb(knee, ankle, 0.2, 0.14, skin)
        if lower_type == "shorts":
            mid = (hip[0] + 0.5 * (knee[0] - hip[0]), hip[1] + 0.5 * (knee[1] - hip[1]))
            p.limb(hip, mid, 0.36, 0.31, lower)
    _draw_shoe(p, attrs, c, ankle, b.view, shade)


def _draw_lower_body(p: _Painter, attrs: dict, c: dict[str, RGB], b: _Body) -> None:
    """Pelvis, skirt or dress skirt, drawn over the legs."""
    lower_type = attrs["lower_type"]
    if lower_type in ("trousers", "jeans", "shorts"):
        if b.view == "side":
            p.poly([(-0.34, 3.1), (0.36, 3.1), (0.36, 3.9), (0.0, 4.2), (-0.36, 3.9)], c["lower"])
        else:
            p.poly([(-b.hip, 3.15), (b.hip, 3.15), (b.hip + 0.02, 3.95), (0.05, 4.05), (-0.05, 4.05),
                    (-b.hip - 0.02, 3.95)], c["lower"])
        return
    if lower_type == "skirt" or attrs["upper_type"] == "dress":
        hem = _SKIRT_HEM_Y[attrs["lower_length"]]
        flare = 0.22 + 0.1 * (hem - 4.5)
        dress = attrs["upper_type"] == "dress"
        colour = c["upper"] if dress else c["lower"]
        top = _WAIST_Y if dress else 3.1
        if b.view == "side":
            pts = [(-0.33, top), (0.35, top), (0.38 + flare + 0.1 * b.stride, hem), (-0.36 - flare, hem)]
        else:
            pts = [(-b.waist - 0.02, top), (b.waist + 0.02, top), (b.hip + 0.02, _HIP_Y),
                   (b.hip + flare, hem), (-b.hip - flare, hem), (-b.hip - 0.02, _HIP_Y)]
        p.poly(pts, colour, patterned=dress)


def _draw_arm(p: _Painter, attrs: dict, c: dict[str, RGB], b: _Body, near: bool, shade: float) -> tuple[float, float]:
    sh, el, wr = _arm_points(b, near)
    skin, sleeve_colour = _scale(c["skin"], shade), _scale(c["upper"], shade)
    sleeve = attrs["sleeve"]
    patterned = attrs["upper_pattern"] in ("striped", "checked", "dotted")
    p.limb(sh, el, 0.16, 0.13, skin)
    p.limb(el, wr, 0.13, 0.1, skin)
    if sleeve == "short":
        mid = (sh[0] + 0.55 * (el[0] - sh[0]), sh[1] + 0.55 * (el[1] - sh[1]))
        p.limb(sh, mid, 0.22, 0.19, sleeve_colour, patterned=patterned)
    elif sleeve == "long":
        p.limb(sh, el, 0.21, 0.18, sleeve_colour, patterned=patterned)
        p.limb(el, wr, 0.18, 0.15, sleeve_colour, patterned=patterned)
    p.ellipse(wr[0], wr[1] + 0.1, 0.13, 0.16, skin)
    return wr[0], wr[1] + 0.12


def _draw_torso(p: _Painter, attrs: dict, c: dict[str, RGB], b: _Body) -> None:
    upper = attrs["upper_type"]
    patterned = attrs["upper_pattern"] in ("striped", "checked", "dotted")
    view = b.view
    # Neck first so the collar overlaps it.
    p.poly(_capsule((0.0 if view != "side" else 0.02, 0.8), (0.0 if view != "side" else 0.02, 1.25), 0.14, 0.15),
           c["skin"])
    hem = _HEM_Y[upper]
    outline = _torso_outline(b, hem, flare=0.15 if upper == "coat" else 0.0)
    if upper == "tank top" and view != "side":
        # Bare shoulders either side of the straps.
        p.poly(_torso_outline(b, 1.9), c["skin"])
        w = b.shoulder - 0.3
        outline = [(0.28, 1.2), (w, 1.35), (b.shoulder - 0.1, 1.95), (b.waist, _WAIST_Y), (b.hip, _HIP_Y),
                   (b.hip, hem), (-b.hip, hem), (-b.hip, _HIP_Y), (-b.waist, _WAIST_Y),
                   (-b.shoulder + 0.1, 1.95), (-w, 1.35), (-0.28, 1.2), (0.0, 1.45 if view == "front" else 1.25)]
    p.poly(outline, c["upper"], patterned=patterned)
    dark = _scale(c["upper"], 0.62)
    if view == "front":
        if upper in ("jacket", "coat", "hoodie"):  # zip / button line
            p.line([(0.0, 1.3), (0.0, hem - 0.05)], dark, 0.05)
        if upper in ("shirt", "coat", "jacket"):  # collar
            p.poly([(-0.2, 1.07), (0.0, 1.42), (-0.05, 1.2), (-0.28, 1.15)], _scale(c["upper"], 0.85))
            p.poly([(0.2, 1.07), (0.0, 1.42), (0.05, 1.2), (0.28, 1.15)], _scale(c["upper"], 0.85))
        if upper == "hoodie":
            p.poly([(-0.45, 2.85), (0.45, 2.85), (0.55, 3.4), (-0.55, 3.4)], _scale(c["upper"], 0.88))
            p.line([(-0.1, 1.2), (-0.12, 1.75)], (235, 235, 235), 0.035)
            p.line([(0.1, 1.2), (0.12, 1.75)], (235, 235, 235), 0.035)
        if attrs["upper_pattern"] == "logo":
            p.ellipse(0.3, 1.85, 0.17, 0.14, c["pattern"], outline=False)
            p.poly([(0.22, 1.9), (0.3, 1.76), (0.38, 1.9)], _scale(c["pattern"], 0.6), outline=False)
    elif view == "back" and upper == "hoodie":
        p.poly([(-0.45, 1.15), (0.45, 1.15), (0.35, 1.85), (0.0, 1.95), (-0.35, 1.85)], _scale(c["upper"], 0.85))
    elif view == "side" and upper == "hoodie":
        p.poly([(-0.2, 1.05), (-0.42, 1.25), (-0.4, 1.8), (-0.15, 1.6)], _scale(c["upper"], 0.85))
    if upper == "sweater":  # ribbed hem band
        p.line([(-b.hip + 0.02, hem - 0.08), (b.hip - 0.02, hem - 0.08)] if view != "side" else
               [(-0.34, hem - 0.08), (0.36, hem - 0.08)], dark, 0.08)


def _draw_head(p: _Painter, attrs: dict, c: dict[str, RGB], view: str) -> None:
    skin, hair = c["skin"], c["hair"]
    length = attrs["hair_length"]
    bald = length == "bald"
    if view == "side":
        p.ellipse(0.06, 0.52, 0.4, 0.5, skin)
        p.poly([(0.42, 0.45), (0.54, 0.66), (0.42, 0.7)], skin, outline=False)  # nose
        if not bald:
            # Hair covers the top and the back of the skull; the face stays clear at the front.
            p.poly(_ellipse_pts(0.04, 0.5, 0.45, 0.53, math.pi * 0.58, math.pi * 1.88, 14)
                   + [(0.26, 0.2), (0.08, 0.36), (0.0, 0.62), (-0.12, 0.9)], hair)
        p.ellipse(0.0, 0.58, 0.08, 0.12, _scale(skin, 0.9))  # ear
        p.ellipse(0.3, 0.5, 0.04, 0.04, (35, 30, 30), outline=False)
        if attrs["glasses"] != "none":
            lens = (20, 20, 24) if attrs["glasses"] == "sunglasses" else (200, 210, 220)
            p.poly(_ellipse_pts(0.34, 0.5, 0.09, 0.07), lens)
            p.line([(0.26, 0.48), (0.02, 0.5)], (30, 30, 30), 0.035)
        p.line([(0.3, 0.82), (0.4, 0.81)], _scale(skin, 0.6), 0.03)
    elif view == "back":
        p.ellipse(-0.37, 0.56, 0.07, 0.12, skin)
        p.ellipse(0.37, 0.56, 0.07, 0.12, skin)
        p.ellipse(0.0, 0.52, 0.36, 0.5, hair if not bald else skin)
    else:
        p.ellipse(-0.36, 0.56, 0.07, 0.12, _scale(skin, 0.92))
        p.ellipse(0.36, 0.56, 0.07, 0.12, _scale(skin, 0.92))
        if bald:
            p.ellipse(0.0, 0.52, 0.36, 0.5, skin)
        else:
            p.ellipse(0.0, 0.4, 0.38, 0.42, hair)
            p.ellipse(0.0, 0.6, 0.32, 0.42, skin)
            p.poly([(-0.32, 0.4), (-0.1, 0.24), (0.2, 0.22), (0.33, 0.42), (0.34, 0.2), (0.0, 0.02), (-0.34, 0.2)],
                   hair, outline=False)  # fringe
        eye_y = 0.56
        for ex in (-0.13, 0.13):
            p.ellipse(ex, eye_y, 0.045, 0.04, (35, 30, 30), outline=False)
        p.line([(-0.08, 0.82), (0.08, 0.82)], _scale(skin, 0.6), 0.035)
        if attrs["glasses"] != "none":
            sun = attrs["glasses"] == "sunglasses"
            for ex in (-0.14, 0.14):
                if sun:
                    p.ellipse(ex, eye_y, 0.12, 0.08, (18, 18, 22))
                else:
                    p.draw.ellipse(_bbox(p, ex, eye_y, 0.11, 0.085), outline=(30, 30, 30), width=p.edge)
            p.line([(-0.04, eye_y), (0.04, eye_y)], (30, 30, 30), 0.035)
    _draw_headwear(p, attrs, c, view)


def _bbox(p: _Painter, cx: float, cy: float, rx: float, ry: float) -> list[float]:
    (x0, y0), (x1, y1) = p.xy([(cx - rx, cy - ry), (cx + rx, cy + ry)])
    return [min(x0, x1), y0, max(x0, x1), y1]


def _draw_headwear(p: _Painter, attrs: dict, c: dict[str, RGB], view: str) -> None:
    kind = attrs["headwear"]
    if kind == "none":
        return
    col = c["headwear"]
    dx = 0.04 if view == "side" else 0.0
    if kind == "cap":
        p.poly(_ellipse_pts(dx, 0.36, 0.4, 0.36, math.pi, 2 * math.pi, 12), col)
        if view == "front":
            p.ellipse(0.0, 0.36, 0.36, 0.07, _scale(col, 0.8))
        elif view == "side":
            p.poly([(0.3, 0.3), (0.72, 0.36), (0.7, 0.42), (0.3, 0.4)], _scale(col, 0.8))
    elif kind == "hat":
        p.ellipse(dx, 0.26, 0.62, 0.1, _scale(col, 0.85))
        p.poly([(dx - 0.33, 0.26), (dx - 0.3, -0.08), (dx + 0.3, -0.08), (dx + 0.33, 0.26)], col)
        p.line([(dx - 0.32, 0.18), (dx + 0.32, 0.18)], _scale(col, 0.55), 0.07)
    else:  # beanie with a folded band
        p.poly(_ellipse_pts(dx, 0.38, 0.4, 0.44, math.pi, 2 * math.pi, 12), col)
        p.poly([(dx - 0.41, 0.24), (dx + 0.41, 0.24), (dx + 0.41, 0.4), (dx - 0.41, 0.4)], _scale(col, 0.85))


def _draw_back_hair(p: _Painter, attrs: dict, c: dict[str, RGB], view: str) -> None:
    """Hair mass that falls behind the head (front/side) or down the back (back view)."""
    length = attrs["hair_length"]
    if length not in ("medium", "long"):
        return
    bottom = 1.25 if length == "medium" else 2.4
    if view == "side":
        p.poly([(-0.35, 0.3), (0.05, 0.35), (-0.05, bottom - 0.1), (-0.3, bottom), (-0.5, bottom - 0.2),
                (-0.45, 0.6)], c["hair"])
    else:
        p.poly([(-0.42, 0.4), (0.42, 0.4), (0.46, bottom - 0.1), (0.3, bottom), (-0.3, bottom), (-0.46, bottom - 0.1)],
               c["hair"])


def _draw_front_strands(p: _Painter, attrs: dict, c: dict[str, RGB]) -> None:
    """Long hair falling over the shoulders, drawn in front of the torso in the front view."""
    if attrs["hair_length"] != "long":
        return
    for s in (-1, 1):
        p.poly([(s * 0.3, 0.5), (s * 0.42, 0.55), (s * 0.5, 1.4), (s * 0.46, 2.1), (s * 0.3, 1.95), (s * 0.28, 1.2)],
               c["hair"])


def _draw_backpack(p: _Painter, c: dict[str, RGB], b: _Body, stage: str) -> None:
    bag = c["bag"]
    if b.view == "back" and stage == "over":
        p.poly([(-0.6, 1.75), (-0.5, 1.5), (0.5, 1.5), (0.6, 1.75), (0.62, 3.25), (-0.62, 3.25)], bag)
        p.poly([(-0.5, 1.55), (0.5, 1.55), (0.52, 2.1), (-0.52, 2.1)], _scale(bag, 0.8))  # flap
        p.poly([(-0.36, 2.5), (0.36, 2.5), (0.36, 3.1), (-0.36, 3.1)], _scale(bag, 0.88))  # pocket
        p.line([(-0.35, 1.55), (-0.5, 1.3)], _scale(bag, 0.7), 0.08)
        p.line([(0.35, 1.55), (0.5, 1.3)], _scale(bag, 0.7), 0.08)
    elif b.view == "front" and stage == "over":
        for s in (-1, 1):  # from the front only the straps show
            p.poly([(s * 0.42, 1.2), (s * 0.6, 1.25), (s * 0.56, 2.7), (s * 0.42, 2.7)], bag)
    elif b.view == "side":
        if stage == "behind":
            p.poly([(-0.3, 1.6), (-0.75, 1.7), (-0.82, 2.2), (-0.78, 3.2), (-0.3, 3.2)], bag)
            p.poly([(-0.72, 2.5), (-0.86, 2.55), (-0.84, 3.05), (-0.72, 3.1)], _scale(bag, 0.85))
        else:
            p.line([(0.12, 1.22), (0.2, 1.7), (0.05, 2.6)], _scale(bag, 0.9), 0.09)


def _draw_shoulder_bag(p: _Painter, c: dict[str, RGB], b: _Body) -> None:
    bag = c["bag"]
    if b.view == "side":
        p.line([(0.05, 1.25), (0.1, 2.3), (0.0, 3.0)], _scale(bag, 0.85), 0.06)
        p.poly([(-0.3, 2.95), (0.3, 2.95), (0.34, 3.7), (-0.34, 3.7)], bag)
        return
    side = 1 if b.view == "front" else -1
    p.line([(-side * (b.shoulder - 0.3), 1.25), (side * (b.hip + 0.1), 3.0)], _scale(bag, 0.85), 0.07)
    x0 = side * (b.hip - 0.05)
    x1 = side * (b.hip + 0.55)
    p.poly([(x0, 2.95), (x1, 2.95), (x1 + side * 0.03, 3.7), (x0, 3.7)], bag)
    p.poly([(x0, 2.95), (x1, 2.95), (x1, 3.2), (x0, 3.2)], _scale(bag, 0.85))


def _draw_handbag(p: _Painter, c: dict[str, RGB], hand: tuple[float, float]) -> None:
    bag = c["bag"]
    hx, hy = hand
    p.line([(hx - 0.15, hy + 0.3), (hx, hy - 0.05), (hx + 0.15, hy + 0.3)], _scale(bag, 0.7), 0.05)
    p.poly([(hx - 0.28, hy + 0.25), (hx + 0.28, hy + 0.25), (hx + 0.34, hy + 0.85), (hx - 0.34, hy + 0.85)], bag)


def _draw_suitcase(p: _Painter, c: dict[str, RGB], hand: tuple[float, float], view: str) -> None:
    bag = c["bag"]
    hx, hy = hand
    ground = _ANKLE_Y + 0.25
    top = hy + 0.5
    if view == "side":
        # Pulled behind, tilted: the handle runs from the hand to the case.
        x_case = hx - 0.75
        p.line([(hx, hy), (x_case + 0.3, top + 0.3)], (70, 70, 75), 0.06)
        p.poly([(x_case - 0.2, top + 0.15), (x_case + 0.55, top + 0.35), (x_case + 0.35, ground - 0.1),
                (x_case - 0.4, ground - 0.3)], bag)
        p.ellipse(x_case + 0.3, ground - 0.05, 0.07, 0.07, (30, 30, 30))
        return
    w = 0.42
    p.line([(hx, hy), (hx, top)], (70, 70, 75), 0.06)
    p.poly([(hx - w, top), (hx + w, top), (hx + w, ground - 0.1), (hx - w, ground - 0.1)], bag)
    p.line([(hx - w * 0.4, top + 0.1), (hx - w * 0.4, ground - 0.2)], _scale(bag, 0.75), 0.04)
    p.line([(hx + w * 0.4, top + 0.1), (hx + w * 0.4, ground - 0.2)], _scale(bag, 0.75), 0.04)


def _draw_person(p: _Painter, attrs: dict, c: dict[str, RGB], b: _Body) -> None:
    carried = attrs["carried"]
    view = b.view
    p.set_pattern(attrs["upper_pattern"], c["pattern"])
    if view == "side":
        far = 0.78  # far limbs are darker: reads as depth
        if carried == "suitcase":  # the near hand reaches back for the handle
            b.arm_swing = -abs(b.arm_swing) - 0.15
        _draw_arm(p, attrs, c, b, near=False, shade=far)
        _draw_leg(p, attrs, c, b, near=False, shade=far)
        _draw_back_hair(p, attrs, c, view)
        if carried == "backpack":
            _draw_backpack(p, c, b, "behind")
        _draw_leg(p, attrs, c, b, near=True, shade=1.0)
        _draw_lower_body(p, attrs, c, b)
        _draw_torso(p, attrs, c, b)
        if carried == "backpack":
            _draw_backpack(p, c, b, "over")
        if carried == "shoulder bag":
            _draw_shoulder_bag(p, c, b)
        hand = _draw_arm(p, attrs, c, b, near=True, shade=1.0)
        if carried == "handbag":
            _draw_handbag(p, c, hand)
        elif carried == "suitcase":
            _draw_suitcase(p, c, hand, view)
        _draw_head(p, attrs, c, view)
        return

    if view == "front":
        _draw_back_hair(p, attrs, c, view)
    # The carrying hand is on the image's right in the front view and on the left from behind.
    carry_near = view == "front"
    if carried == "suitcase":
        if carry_near:
            b.arm_swing = 0.3
        else:
            b.arm_swing_other = 0.3
    for near in (True, False):
        _draw_leg(p, attrs, c, b, near=near, shade=1.0)
    _draw_lower_body(p, attrs, c, b)
    if carried == "suitcase":
        sh, el, wr = _arm_points(b, carry_near)
        _draw_suitcase(p, c, (wr[0], wr[1] + 0.12), view)
    _draw_torso(p, attrs, c, b)
    if view == "back":
        _draw_back_hair(p, attrs, c, view)
    if carried == "backpack":
        _draw_backpack(p, c, b, "over")
    if carried == "shoulder bag":
        _draw_shoulder_bag(p, c, b)
    hands = {near: _draw_arm(p, attrs, c, b, near=near, shade=1.0) for near in (True, False)}
    if carried == "handbag":
        _draw_handbag(p, c, hands[carry_near])
    if view == "front":
        _draw_front_strands(p, attrs, c)
    _draw_head(p, attrs, c, view)


def _draw_background(rng: np.random.Generator, w: int, h: int, style: SynthStyle) -> Image.Image:
    """A street-like scene at output resolution: gradient sky/wall, ground with paving, clutter."""
    horizon = int(h * rng.uniform(0.42, 0.72))
    kind = int(rng.integers(4))
    base = rng.uniform(60, 200, size=3)
    top_c = np.clip(base + rng.normal(0, 25, 3), 0, 255)
    mid_c = np.clip(base * rng.uniform(0.6, 1.1) + rng.normal(0, 20, 3), 0, 255)
    ground = rng.uniform(70, 170) + rng.normal(0, 12, 3)
    ground_far = np.clip(ground * rng.uniform(0.8, 1.1), 0, 255)
    ys = np.arange(h, dtype=np.float32)[:, None]
    t_up = np.clip(ys / max(horizon, 1), 0, 1)
    t_down = np.clip((ys - horizon) / max(h - horizon, 1), 0, 1)
    upper = top_c[None, :] * (1 - t_up) + mid_c[None, :] * t_up
    lower = ground_far[None, :] * (1 - t_down) + ground[None, :] * t_down
    column = np.where(ys < horizon, upper, lower).astype(np.float32)  # (h, 3)
    # Low-frequency mottling so flat areas are not perfectly flat.
    coarse = rng.normal(0, 10, size=(max(2, h // 16), max(2, w // 16))).astype(np.float32)
    mottle = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
    arr = column[:, None, :] + mottle[:, :, None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)

    def muted() -> RGB:
        c = rng.uniform(20, 235, size=3)
        return _mix(c, base, rng.uniform(0.2, 0.6))

    if kind == 0:  # facade with windows
        facade = _mix(muted(), top_c, 0.3)
        d.rectangle([0, 0, w, horizon], fill=facade)
        win = _scale(facade, rng.uniform(0.45, 0.75))
        ww, wh = rng.uniform(0.12, 0.25) * w, rng.uniform(0.06, 0.12) * h
        gap_x, gap_y = ww * rng.uniform(0.4, 0.9), wh * rng.uniform(0.5, 1.0)
        y = rng.uniform(-wh, gap_y)
        while y < horizon - wh:
            x = rng.uniform(-ww, gap_x)
            while x < w:
                d.rectangle([x, y, x + ww, y + wh], fill=win)
                x += ww + gap_x
            y += wh + gap_y
    elif kind == 1:  # trees / bushes
        for _ in range(int(rng.integers(3, 8))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, horizon)
            r = rng.uniform(0.15, 0.45) * w
            green = _mix((40 + rng.uniform(0, 40), 90 + rng.uniform(0, 60), 40 + rng.uniform(0, 30)), base, 0.25)
            d.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=green)
    elif kind == 2:  # shop front: panels and a sign
        for _ in range(int(rng.integers(2, 5))):
            x0 = rng.uniform(-0.2, 0.9) * w
            d.rectangle([x0, rng.uniform(0.05, 0.4) * horizon, x0 + rng.uniform(0.2, 0.6) * w, horizon], fill=muted())
        sy = rng.uniform(0.05, 0.3) * horizon
        d.rectangle([0, sy, w, sy + 0.06 * h], fill=muted())
    # kind 3 keeps the plain gradient (open plaza)

    # Paving: horizontal joints getting wider towards the camera plus lines to a vanishing point.
    joint = _scale(ground, rng.uniform(0.7, 0.85))
    y, step = float(horizon), max(2.0, 0.02 * h)
    while y < h:
        d.line([(0, y), (w, y)], fill=joint, width=1)
        step *= 1.35
        y += step
    vx = rng.uniform(0.2, 0.8) * w
    for k in range(-6, 7):
        d.line([(vx, horizon), (vx + k * 0.35 * w, h)], fill=joint, width=1)
    if rng.random() < 0.5:  # kerb
        ky = horizon + rng.uniform(0.05, 0.2) * (h - horizon)
        d.rectangle([0, ky, w, ky + 0.012 * h + 1], fill=_scale(ground, 1.2))

    for _ in range(int(rng.integers(style.clutter_shapes[0], style.clutter_shapes[1] + 1))):
        shape = int(rng.integers(4))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        sw_, sh_ = rng.uniform(0.05, 0.35) * w, rng.uniform(0.03, 0.25) * h
        colour = muted()
        if shape == 0:
            d.rectangle([cx - sw_ / 2, cy - sh_ / 2, cx + sw_ / 2, cy + sh_ / 2], fill=colour)
        elif shape == 1:
            d.ellipse([cx - sw_ / 2, cy - sh_ / 2, cx + sw_ / 2, cy + sh_ / 2], fill=colour)
        elif shape == 2:  # pole / lamp post
            pw = rng.uniform(0.02, 0.05) * w
            d.rectangle([cx - pw, rng.uniform(0, 0.3) * h, cx + pw, horizon + rng.uniform(0, 0.3) * h], fill=colour)
        else:
            pts = [(cx + rng.uniform(-sw_, sw_), cy + rng.uniform(-sh_, sh_)) for _ in range(int(rng.integers(3, 6)))]
            d.polygon(pts, fill=colour)
    return img


def _draw_occluder(img: Image.Image, rng: np.random.Generator, bbox: tuple[float, float, float, float]) -> None:
    """Cover part of the person with a pole, a box/bin, a sign or a passer-by's shoulder."""
    x0, y0, x1, y1 = bbox
    pw, ph = x1 - x0, y1 - y0
    d = ImageDraw.Draw(img)
    colour = tuple(int(v) for v in rng.uniform(30, 220, 3))
    kind = int(rng.integers(4))
    if kind == 0:  # pole
        cx = rng.uniform(x0 + 0.1 * pw, x1 - 0.1 * pw)
        half = rng.uniform(0.05, 0.12) * pw
        grey = int(rng.uniform(60, 190))
        d.rectangle([cx - half, 0, cx + half, img.height], fill=(grey, grey, grey + 8))
        d.rectangle([cx - half, 0, cx - half * 0.4, img.height], fill=(grey + 30, grey + 30, grey + 36))
    elif kind == 1:  # box / bin / bench in front of the legs
        top = y0 + rng.uniform(0.6, 0.8) * ph
        left = rng.uniform(x0 - 0.4 * pw, x0 + 0.4 * pw)
        d.rectangle([left, top, left + rng.uniform(0.5, 0.9) * pw, img.height], fill=colour)
        d.rectangle([left, top, left + rng.uniform(0.5, 0.9) * pw, top + 0.04 * ph], fill=_scale(colour, 0.7))
    elif kind == 2:  # sign board on the side
        side = rng.choice([-1, 1])
        cx = x0 + 0.5 * pw + side * rng.uniform(0.3, 0.5) * pw
        top = y0 + rng.uniform(0.2, 0.5) * ph
        d.rectangle([cx - 0.25 * pw, top, cx + 0.25 * pw, top + 0.3 * ph], fill=colour)
        d.rectangle([cx - 0.03 * pw, top + 0.3 * ph, cx + 0.03 * pw, img.height], fill=(90, 90, 95))
    else:  # a passer-by's shoulder and arm entering from the side
        side = rng.choice([-1, 1])
        cx = (x0 if side < 0 else x1) + side * rng.uniform(-0.05, 0.2) * pw
        top = y0 + rng.uniform(0.2, 0.45) * ph
        d.rounded_rectangle([cx - 0.35 * pw, top, cx + 0.35 * pw, img.height], radius=0.15 * pw, fill=colour)


def render_person_image(attrs: dict, view: str, rng: np.random.Generator, image_size: tuple[int, int] = (256, 112),
                        style: SynthStyle = DEFAULT_STYLE) -> Image.Image:
    """Render one RGB image (height, width = ``image_size``) of the identity seen from ``view``."""
    height, width = image_size
    ss = max(1, int(style.supersample))
    cw, ch = width * ss, height * ss
    # NEAREST upscaling is exact under the final box-reduce, so the background costs output resolution only.
    background = _draw_background(rng, width, height, style).resize((cw, ch), Image.Resampling.NEAREST)

    person_h = rng.uniform(*style.person_height) * ch
    unit = person_h / (_ANKLE_Y + 0.32)
    top = rng.uniform(0.02, 0.98) * (ch - person_h)
    cx = cw / 2 + rng.normal(0, 0.05) * cw
    mirror = int(rng.choice([-1, 1])) if view == "side" else 1
    light = int(rng.choice([-1, 1]))
    female = attrs["gender"] == "female"
    build = rng.uniform(0.95, 1.05)
    body = _Body(
        shoulder=(0.8 if female else 0.92) * build, waist=(0.56 if female else 0.68) * build,
        hip=(0.76 if female else 0.7) * build, view=view,
        arm_swing=rng.uniform(0.25, 0.5) if view == "side" else rng.uniform(0.04, 0.16),
        arm_swing_other=-rng.uniform(0.25, 0.5) if view == "side" else rng.uniform(0.04, 0.16),
        stride=rng.uniform(0.08, 0.38), stance=rng.uniform(-0.02, 0.1),
    )
    colours = _person_colours(attrs, rng, style)
    # Soft ground shadow under the feet (alpha-blended), then the figure on top.
    foot_y = top + (_ANKLE_Y + 0.25) * unit
    ImageDraw.Draw(background, "RGBA").ellipse(
        [cx - 1.1 * unit, foot_y - 0.15 * unit, cx + 1.1 * unit, foot_y + 0.2 * unit], fill=(0, 0, 0, 90))
    painter = _Painter(background, unit, cx, top, mirror, light)
    _draw_person(painter, attrs, colours, body)

    if rng.random() < style.occlusion_prob:
        bbox = (cx - 1.1 * unit, top, cx + 1.1 * unit, top + person_h)
        _draw_occluder(background, rng, bbox)
    img = background.reduce(ss) if ss > 1 else background  # box filter: the anti-aliasing step

    if rng.random() < style.blur_prob:
        # Box blur: visually close to a Gaussian at these radii and three times cheaper.
        img = img.filter(ImageFilter.BoxBlur(rng.uniform(*style.blur_radius)))
    arr = np.asarray(img, dtype=np.float32)
    cast = (1.0 + rng.normal(0.0, style.colour_cast, size=3)) * rng.uniform(*style.brightness)
    # Uneven illumination: a linear ramp in a random direction (outer sum of two 1-D ramps).
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.25)
    ramp_y = (np.arange(height, dtype=np.float32) / height - 0.5) * (strength * math.sin(angle))
    ramp_x = (np.arange(width, dtype=np.float32) / width - 0.5) * (strength * math.cos(angle))
    ramp = 1.0 + ramp_y[:, None] + ramp_x[None, :]
    arr *= ramp[:, :, None]
    arr *= cast.astype(np.float32)
    # Sensor noise is mostly luminance noise: one draw per pixel shared by the channels (and a third
    # of the cost of per-channel noise).
    noise = rng.standard_normal(size=(height, width, 1), dtype=np.float32)
    noise *= rng.uniform(*style.noise_sigma)
    arr += noise
    arr += 0.5
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------
# Dataset generation
# ----------------------------------------------------------------------------------------------


def _assign_views(n: int, rng: np.random.Generator, weights: Sequence[float]) -> list[str]:
    """Views for one identity's images: distinct while possible, then weighted at random."""
    p = np.asarray(weights, dtype=np.float64)
    order = list(rng.choice(3, size=3, replace=False, p=p / p.sum()))
    views = [VIEWS[i] for i in order[:n]]
    views += [VIEWS[int(rng.choice(3, p=p / p.sum()))] for _ in range(n - len(views))]
    return views


def _image_name(pid: int, k: int) -> str:
    return f"{IMAGE_SUBDIR}/{pid:05d}_{k:02d}.jpg"


def _render_identity(task: tuple) -> list[dict]:
    """Worker: render and caption all images of one identity; returns their annotation records."""
    pid, split, attrs, views, seed, image_size, captions_per_image, style, img_dir = task
    records = []
    for k, view in enumerate(views):
        image = render_person_image(attrs, view, np.random.default_rng([seed, pid, k, 0]), image_size, style)
        rel = _image_name(pid, k)
        image.save(Path(img_dir) / rel, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        cap_rng = np.random.default_rng([seed, pid, k, 1])
        n_caps = int(cap_rng.integers(captions_per_image[0], captions_per_image[1] + 1))
        captions = make_captions(attrs, view, cap_rng, n_caps, style.caption_drop_prob)
        records.append({
            "split": split,
            "captions": captions,
            "file_path": rel,
            "processed_tokens": [tokenize(c) for c in captions],
            "id": pid,
            "attributes": dict(attrs),
            "view": view,
        })
    return records


def generate(out_dir: str | Path, identities: int = 1000, seed: int = 0, *,
             images_per_identity: tuple[int, int] = (3, 5), captions_per_image: tuple[int, int] = (2, 3),
             image_size: tuple[int, int] = (256, 112), split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
             workers: int | None = None, overwrite: bool = False, progress: bool = True,
             style: SynthStyle | None = None) -> dict:
    """Generate the synthetic benchmark in CUHK-PEDES layout under ``out_dir``.

    ``image_size`` is (height, width). The annotation file is written last and atomically, so a
    folder that has ``reid_raw.json`` is complete. Returns a summary with per-split counts.
    """
    start = time.perf_counter()
    style = style or DEFAULT_STYLE
    out = Path(out_dir)
    ann_path = out / ANNOTATION_FILE
    if ann_path.exists() and not overwrite:
        raise FileExistsError(f"{ann_path} already exists; pass overwrite=True to regenerate the synthetic set")
    if not (1 <= images_per_identity[0] <= images_per_identity[1]):
        raise ValueError(f"images_per_identity must be (lo, hi) with 1 <= lo <= hi, got {images_per_identity}")
    if not (1 <= captions_per_image[0] <= captions_per_image[1]):
        raise ValueError(f"captions_per_image must be (lo, hi) with 1 <= lo <= hi, got {captions_per_image}")
    if min(image_size) < 16:
        raise ValueError(f"image_size too small: {image_size}")

    people = sample_identities(identities, seed, split_fractions, style)
    img_root = out / "imgs"
    if ann_path.exists():
        ann_path.unlink()  # from here on the folder is "incomplete" until the new file lands
    shutil.rmtree(img_root / IMAGE_SUBDIR, ignore_errors=True)  # no stale images of an older, larger set
    (img_root / IMAGE_SUBDIR).mkdir(parents=True, exist_ok=True)

    count_rng = np.random.default_rng([seed, 0xC0])
    tasks = []
    for pid, (split, attrs) in enumerate(people, start=1):
        n_img = int(count_rng.integers(images_per_identity[0], images_per_identity[1] + 1))
        views = _assign_views(n_img, count_rng, style.view_weights)
        tasks.append((pid, split, attrs, views, seed, tuple(image_size), tuple(captions_per_image), style,
                      str(img_root)))
    total_images = sum(len(t[3]) for t in tasks)

    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    from tqdm.auto import tqdm  # imported lazily: only generation needs it

    results: dict[int, list[dict]] = {}
    with tqdm(total=total_images, unit="img", desc="synth", disable=not progress) as bar:
        if workers == 1:
            for task in tasks:
                results[task[0]] = _render_identity(task)
                bar.update(len(task[3]))
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                for recs in pool.imap_unordered(_render_identity, tasks, chunksize=8):
                    results[recs[0]["id"]] = recs
                    bar.update(len(recs))
    records = [r for pid in sorted(results) for r in results[pid]]

    with atomic_write(ann_path, "w") as handle:
        json.dump(records, handle)

    splits: dict[str, dict[str, int]] = {}
    for name in ("train", "val", "test"):
        recs = [r for r in records if r["split"] == name]
        splits[name] = {"images": len(recs), "identities": len({r["id"] for r in recs}),
                        "captions": sum(len(r["captions"]) for r in recs)}
    return {
        "root": str(out),
        "annotation_file": str(ann_path),
        "images": len(records),
        "identities": len(people),
        "captions": sum(s["captions"] for s in splits.values()),
        "splits": splits,
        "seed": seed,
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 3),
    }


# ----------------------------------------------------------------------------------------------
# Contact sheet
# ----------------------------------------------------------------------------------------------

SHEET_SCALE = 2  # images are enlarged so the figure details are visible in the README
SHEET_PAD = 6
SHEET_CAPTION_LINES = 7


def _sheet_font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def _wrap(text: str, font: Any, width: float, draw: ImageDraw.ImageDraw, max_lines: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = textwrap.shorten(lines[-1] + " ...", width=max(8, len(lines[-1])), placeholder=" ...")
    return lines


def contact_sheet(root: str | Path, out_png: str | Path, n: int = 12, seed: int = 0, columns: int = 6) -> Path:
    """Write a PNG grid of ``n`` sample images (several identities and views) with their first caption."""
    root = Path(root)
    records = json.loads((root / ANNOTATION_FILE).read_text(encoding="utf-8"))
    if not records:
        raise ValueError(f"{root / ANNOTATION_FILE} has no records")
    rng = np.random.default_rng(seed)
    order = [records[i] for i in rng.permutation(len(records))]
    # Round-robin over views, one image per identity, so the sheet shows variety.
    chosen: list[dict] = []
    used_ids: set[int] = set()
    by_view = {v: [r for r in order if r.get("view") == v] for v in VIEWS}
    n = min(n, len(records))
    while len(chosen) < n and any(by_view.values()):
        for view in VIEWS:
            pool = by_view[view]
            while pool and pool[0]["id"] in used_ids:
                pool.pop(0)
            if pool and len(chosen) < n:
                rec = pool.pop(0)
                chosen.append(rec)
                used_ids.add(rec["id"])
    for rec in order:  # fewer identities than n: allow repeats
        if len(chosen) >= n:
            break
        if rec not in chosen:
            chosen.append(rec)

    images = [Image.open(root / "imgs" / rec["file_path"]).convert("RGB") for rec in chosen]
    img_w, img_h = images[0].size
    cell_w = img_w * SHEET_SCALE + 2 * SHEET_PAD
    font = _sheet_font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(math.ceil(probe.textbbox((0, 0), "Ag", font=font)[3])) + 3
    cell_h = img_h * SHEET_SCALE + 3 * SHEET_PAD + SHEET_CAPTION_LINES * line_h
    cols = max(1, min(columns, len(images)))
    rows = int(math.ceil(len(images) / cols))
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (rec, image) in enumerate(zip(chosen, images)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        big = image.resize((img_w * SHEET_SCALE, img_h * SHEET_SCALE), Image.Resampling.BICUBIC)
        sheet.paste(big, (x + SHEET_PAD, y + SHEET_PAD))
        text_y = y + img_h * SHEET_SCALE + 2 * SHEET_PAD
        caption = f"[{rec['id']} {rec.get('view', '')}] {rec['captions'][0]}"
        for j, line in enumerate(_wrap(caption, font, cell_w - 2 * SHEET_PAD, draw, SHEET_CAPTION_LINES)):
            draw.text((x + SHEET_PAD, text_y + j * line_h), line, fill=(20, 20, 20), font=font)
    out_png = Path(out_png)
    with atomic_write(out_png, "wb") as handle:
        sheet.save(handle, format="PNG")
    return out_png
