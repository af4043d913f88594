"""Intervals over documents: each draw's statistic from per-document sums equals the statistic computed
directly on the resampled rows, far from the origin; the draws are shared, so differences are paired."""

import numpy as np
import pytest
import torch

from dictlab.measures.metrics import ReconstructionMeter
from dictlab.measures.resampling import draw_counts, fvu_draws, interval, paired_difference, ratio_draws


def _documents(n_docs=12, d=8, seed=0):
    """Rows at norm ~5000, grouped in documents of different lengths, each with its own offset; two
    reconstructions: one good, one with three times the error."""
    g = torch.Generator().manual_seed(seed)
    far = torch.randn(d, generator=g)
    far = 5000 * far / far.norm()
    docs, good, bad = [], [], []
    for i in range(n_docs):
        n = 5 + 7 * i % 23
        x = far + 3 * torch.randn(d, generator=g) + torch.randn(n, d, generator=g)
        noise = 0.3 * torch.randn(n, d, generator=g)
        docs.append(x)
        good.append(x + noise)
        bad.append(x + 3 * noise)
    return docs, good, bad


def _per_document(docs, hats):
    meter = ReconstructionMeter(1, len(docs))
    for i, (x, hat) in enumerate(zip(docs, hats)):
        codes = torch.ones(len(x), 1)
        meter.update(x, hat, codes, torch.zeros(len(x), 1, dtype=torch.long), torch.full((len(x),), i))
    return meter.per_document()


def _direct_fvu(docs, hats, counts):
    """FVU on the rows of the resampled documents (each taken `count` times), two-pass float64."""
    x = np.concatenate([d.double().numpy() for d, c in zip(docs, counts) for _ in range(int(c))])
    hat = np.concatenate([h.double().numpy() for h, c in zip(hats, counts) for _ in range(int(c))])
    return ((x - hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def test_draws_are_seeded_whole_resamples_and_need_two_documents():
    counts = draw_counts(7, 50, seed=3)
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all()
    assert (counts == draw_counts(7, 50, seed=3)).all() and not (counts == draw_counts(7, 50, seed=4)).all()
    assert draw_counts(1, 50, 0) is None and draw_counts(5, 0, 0) is None
    assert interval([0.5]) is None and interval([np.nan, 1.0, np.inf]) is None


def test_fvu_of_each_draw_equals_fvu_on_the_resampled_rows_far_from_the_origin():
    docs, good, _ = _documents()
    sums = _per_document(docs, good)
    counts = draw_counts(len(docs), 40, seed=1)
    draws = fvu_draws(counts, **sums)
    direct = np.array([_direct_fvu(docs, good, c) for c in counts])
    np.testing.assert_allclose(draws, direct, rtol=1e-9)
    # all documents once: the full-sample FVU, the meter's own
    np.testing.assert_allclose(fvu_draws(np.ones((1, len(docs))), **sums)[0], _direct_fvu(docs, good, [1] * 12),
                               rtol=1e-9)


def test_ratio_draws_equal_ce_recovered_on_the_resampled_tokens():
    rng = np.random.default_rng(0)
    tokens = [rng.integers(3, 30) for _ in range(9)]
    clean, spliced, ablated = ([rng.normal(m, 1.0, n) for n in tokens] for m in (2.0, 2.5, 6.0))
    per_doc = {k: np.array([v.sum() for v in vs]) for k, vs in (("c", clean), ("s", spliced), ("a", ablated))}
    counts = draw_counts(9, 30, seed=2)
    draws = ratio_draws(counts, per_doc["a"] - per_doc["s"], per_doc["a"] - per_doc["c"])
    for c, got in zip(counts, draws):
        take = [i for i, n in enumerate(c) for _ in range(int(n))]
        a, s, cl = (np.concatenate([vs[i] for i in take]).mean() for vs in (ablated, spliced, clean))
        assert got == pytest.approx((a - s) / (a - cl), rel=1e-12)


def test_paired_difference_uses_the_same_documents_for_both_rows():
    docs, good, bad = _documents(n_docs=20)
    counts = draw_counts(len(docs), 200, seed=0)
    a, b = fvu_draws(counts, **_per_document(docs, good)), fvu_draws(counts, **_per_document(docs, bad))
    direct = [_direct_fvu(docs, good, c) - _direct_fvu(docs, bad, c) for c in counts[:10]]
    np.testing.assert_allclose((a - b)[:10], direct, rtol=1e-9)
    full = fvu_draws(np.ones((1, len(docs))), **_per_document(docs, good))[0]
    worse = fvu_draws(np.ones((1, len(docs))), **_per_document(docs, bad))[0]
    diff = paired_difference(a, b, full, worse)
    assert diff["significant"] and diff["low"] <= diff["difference"] <= diff["high"] < 0
    # the error is 9x in every document: the paired interval is far tighter than the unpaired spread
    assert diff["high"] - diff["low"] < (interval(a)[1] - interval(a)[0]) + (interval(b)[1] - interval(b)[0])
    same = paired_difference(a, a, full, full)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "significant": False}
    assert paired_difference([1.0], [0.5], 1.0, 0.5) is None
