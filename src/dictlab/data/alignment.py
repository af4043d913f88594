"""Token positions of two tokenizers that see the same text up to the same character.

Two models with different tokenizers split one text differently; a position of model A and one of
model B are comparable when their tokens end at the same character of the text (both have read
exactly that prefix). Tokens with an empty span (BOS, special tokens) are never aligned. Where
several tokens of one tokenizer end at the same character (byte pieces of one character), the last
one stands for them: it is the first to have seen the whole character.
"""

from __future__ import annotations

import numpy as np


def _last_per_end(ends: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = np.flatnonzero(keep)
    ends = ends[index]
    if len(ends) and np.any(np.diff(ends) < 0):
        raise ValueError("token end offsets must not decrease along the sequence")
    last = np.append(ends[1:] != ends[:-1], True)  # the last token of each run of equal ends
    return ends[last], index[last]


def align_by_characters(spans_a, spans_b) -> np.ndarray:
    """[M, 2] position pairs (i in A, j in B) whose tokens end at the same character, in text order.

    `spans_a`, `spans_b`: [T, 2] (start, end) character offsets of each token, as a fast tokenizer's
    offset mapping gives them."""
    a, b = np.asarray(spans_a, dtype=np.int64).reshape(-1, 2), np.asarray(spans_b, dtype=np.int64).reshape(-1, 2)
    ends_a, index_a = _last_per_end(a[:, 1], a[:, 1] > a[:, 0])
    ends_b, index_b = _last_per_end(b[:, 1], b[:, 1] > b[:, 0])
    _, where_a, where_b = np.intersect1d(ends_a, ends_b, assume_unique=True, return_indices=True)
    return np.stack([index_a[where_a], index_b[where_b]], axis=1)


def token_spans(tokenizer, text: str, max_length: int | None = None,
                special_tokens: bool = True) -> tuple[list[int], np.ndarray]:
    """Token ids (special tokens included, as the model sees them, unless `special_tokens` is false) and
    their character spans in `text`."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("character alignment needs a fast tokenizer (offset mappings); this one is not")
    out = tokenizer(text, return_offsets_mapping=True, truncation=max_length is not None, max_length=max_length,
                    add_special_tokens=special_tokens)
    return list(out["input_ids"]), np.asarray(out["offset_mapping"], dtype=np.int64).reshape(-1, 2)
