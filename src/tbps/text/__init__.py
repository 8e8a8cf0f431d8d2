"""Text processing: caption normalisation, tokenisers, sub-sentence spans and noun phrases."""

from tbps.text.phrases import (
    ModelIntegrityError,
    NounPhraseExtractor,
    PhraseBackendUnavailable,
    available_backends,
    pad_phrases,
    verify_model_files,
)
from tbps.text.split import split_sub_sentences, sub_sentence_masks, sub_sentence_token_spans, token_span_masks
from tbps.text.tokenizers import (
    EmptyCaptionError,
    TextModelNotFoundError,
    WordPieceTokenizer,
    WordVocabulary,
    default_text_model_path,
    normalize_caption,
)

__all__ = [
    "EmptyCaptionError",
    "ModelIntegrityError",
    "NounPhraseExtractor",
    "PhraseBackendUnavailable",
    "TextModelNotFoundError",
    "WordPieceTokenizer",
    "WordVocabulary",
    "available_backends",
    "default_text_model_path",
    "normalize_caption",
    "pad_phrases",
    "split_sub_sentences",
    "sub_sentence_masks",
    "sub_sentence_token_spans",
    "token_span_masks",
    "verify_model_files",
]
