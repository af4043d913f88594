"""The same held-out text seen by several models, and the positions where two of them can be compared.

Each document (from the corpus's eval split, so never seen by the dictionaries' fitting) is cut to
the prefix that every model's tokenizer fits in `context_length − 1` tokens, and each model reads it
after its start token. Two models' positions are comparable where their tokens end at the same
character (alignment.py); each document contributes the same number m of such positions to every
pair, spread evenly over the document, so that documents can be permuted against each other position
by position (the null) and resampled whole (the intervals). A position is word-aligned when the next
character is whitespace: both models have just finished a word, and each predicts the start of the
next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dictlab.data.alignment import align_by_characters, token_spans
from dictlab.data.corpus import documents, split_of
from dictlab.errors import DictlabError


@dataclass
class ModelText:
    """One model's tokens of every document: start token first (its span (0, 0))."""

    ids: list[list[int]]
    spans: list[np.ndarray]  # per document: [T, 2] character spans


@dataclass
class PairRows:
    """The m compared positions of each document for models A and B ([D, m] each)."""

    a: np.ndarray  # position in A's context (start token = 0)
    b: np.ndarray
    ends: np.ndarray  # the character both tokens end at
    word: np.ndarray  # True where the next character is whitespace (a word boundary in both)


def _spans(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    try:
        return token_spans(tokenizer, text, special_tokens=False)
    except ValueError as e:
        raise DictlabError(f"comparing models needs fast tokenizers: {e}") from e


def tokenize(tokenizer, text: str, start: int) -> tuple[list[int], np.ndarray]:
    """The model's input for `text` (its start token, then the text's tokens) and each token's span."""
    ids, spans = _spans(tokenizer, text)
    return [start, *ids], np.concatenate([np.zeros((1, 2), dtype=np.int64), spans])


def word_boundary(text: str, ends: np.ndarray) -> np.ndarray:
    """True where the character after `end` is whitespace and the one before is not."""
    return np.array([0 < e < len(text) and text[e].isspace() and not text[e - 1].isspace() for e in ends], dtype=bool)


def choose(aligned: np.ndarray, m: int) -> np.ndarray:
    """m of the aligned position pairs, evenly spread (the first and the last included)."""
    return aligned[np.round(np.linspace(0, len(aligned) - 1, m)).astype(int)]


def sample_texts(source: str, field: str, eval_fraction: float, seed: int, tokenizers: list, context_length: int,
                 n_docs: int, per_doc: int, pairs: list[tuple[int, int]], min_chars: int = 20) -> list[tuple[int, str]]:
    """The first `n_docs` eval documents (id, text) that, cut to fit every tokenizer's context, give at
    least `per_doc` aligned positions for every pair of models; fewer is an error naming what was found."""
    out, seen = [], 0
    for doc_id, text in enumerate(documents(source, field)):
        if split_of(doc_id, eval_fraction, seed) != "eval" or len(text.strip()) < min_chars:
            continue
        seen += 1
        text = _fit(text[: 16 * context_length], tokenizers, context_length)
        spans = [_spans(t, text)[1] for t in tokenizers]
        if all(len(align_by_characters(spans[i], spans[j])) >= per_doc for i, j in pairs):
            out.append((doc_id, text))
            if len(out) == n_docs:
                return out
    raise DictlabError(f"only {len(out)} of the corpus's {seen} eval documents give {per_doc} aligned positions to "
                       f"every pair of models (wanted {n_docs}): lower text.documents or text.positions, raise "
                       "context_length, or use a larger corpus (or a larger corpus.eval_fraction)")


def _fit(text: str, tokenizers: list, context_length: int) -> str:
    """The longest prefix whose tokens fit every tokenizer's context after its start token."""
    for _ in range(4):  # cutting can re-tokenize the last word; a few rounds settle it
        end = len(text)
        for tokenizer in tokenizers:
            spans = _spans(tokenizer, text)[1]
            if len(spans) > context_length - 1:
                end = min(end, int(spans[context_length - 2, 1]))
        if end == len(text):
            return text
        text = text[:end]
    return text


def pair_rows(a: ModelText, b: ModelText, texts: list[str], per_doc: int) -> PairRows:
    """Each document's `per_doc` compared positions for models A and B."""
    rows = []
    for spans_a, spans_b, text in zip(a.spans, b.spans, texts):
        chosen = choose(align_by_characters(spans_a, spans_b), per_doc)
        ends = spans_a[chosen[:, 0], 1]
        rows.append((chosen[:, 0], chosen[:, 1], ends, word_boundary(text, ends)))
    return PairRows(*(np.stack(column) for column in zip(*rows)))
