"""Character-offset alignment of two tokenizations of one text."""

import pytest


def test_character_alignment_of_two_tokenizations():
    from dictlab.data.alignment import align_by_characters

    # "the cat sat": A = [<bos>, "the", " cat", " sat"], B = [<bos>, "th", "e", " c", "at", " s", "at"]
    a = [(0, 0), (0, 3), (3, 7), (7, 11)]
    b = [(0, 0), (0, 2), (2, 3), (3, 5), (5, 7), (7, 9), (9, 11)]
    assert align_by_characters(a, b).tolist() == [[1, 2], [2, 4], [3, 6]]
    # byte pieces of one character end at the same offset: the last piece stands for them
    c = [(0, 3), (3, 6), (5, 6), (5, 6), (6, 9)]
    d = [(0, 6), (6, 9)]
    assert align_by_characters(c, d).tolist() == [[3, 0], [4, 1]]
    with pytest.raises(ValueError, match="must not decrease"):
        align_by_characters([(0, 5), (0, 3)], d)


def test_token_spans_of_a_fast_tokenizer(tmp_path, make_tokenizer):
    from dictlab.data.alignment import align_by_characters, token_spans

    tokenizer = make_tokenizer(tmp_path)
    text = "the cat sat on a mat"
    ids, spans = token_spans(tokenizer, text)
    assert len(ids) == len(spans) and [text[s:e] for s, e in spans if e > s] == text.split()
    assert align_by_characters(spans, spans)[:, 0].tolist() == [i for i, (s, e) in enumerate(spans) if e > s]
