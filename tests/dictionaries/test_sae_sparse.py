"""The sparse training step's gradients equal the dense formulas' (plain autograd), for every rule."""

import pytest
import torch

from dictlab.dictionaries import sae as sae_module
from dictlab.dictionaries import sae_sparse
from dictlab.dictionaries.sae import SparseAutoencoder


def _formula(pre, xc, w, b, centre):
    """pre's values, with the gradient of (x − centre) W + b by plain autograd (xc = x − centre, detached)."""
    x_in = xc if centre is None else xc + centre.detach() - centre
    exact = x_in @ w + b
    return pre.float() + (exact - exact.detach())


def dense_kernels(monkeypatch):
    """Replace the three kernels by their dense definitions and send every batch down the dense path."""
    monkeypatch.setattr(sae_module, "dense_pre", _formula)
    monkeypatch.setattr(sae_module, "gather_pre",
                        lambda pre, xc, w, b, c, e: _formula(pre, xc, w, b, c)[e.rows, e.cols])

    def decode(values, w_dec, e):
        codes = torch.zeros(e.n_rows, e.n_cols).index_put((e.rows, e.cols), values)
        return codes @ w_dec

    monkeypatch.setattr(sae_module, "decode", decode)
    monkeypatch.setattr(sae_sparse, "SPARSE_MAX_DENSITY", -1.0)


RULES = {
    "topk": dict(rule="topk", k=8),
    "batchtopk": dict(rule="batchtopk", k=8),
    "relu": dict(rule="relu", l1_coeff=0.3),
    "jumprelu": dict(rule="jumprelu", l0_coeff=0.5, bandwidth=0.5, jumprelu_init=0.8),
    "matryoshka": dict(rule="batchtopk", k=8, matryoshka=[32, 128]),
    "matryoshka-topk": dict(rule="topk", k=8, matryoshka=[64]),
    "transcoder": dict(rule="topk", k=8, d_out=48),
    "tied": dict(rule="topk", k=8, tied=True),
    "topk-sparse-auxk": dict(rule="topk", k=8, aux_k=4),  # AuxK over entries: 4 of 171 dead latents per row
    "batchtopk-sparse-auxk": dict(rule="batchtopk", k=8, aux_k=4),
}


def step_gradients(options, x, y, dead):
    sae = SparseAutoencoder(64, 512, seed=3, dead_tokens=1000, **{"aux_k": 16, **options})
    sae.initialize_from_data(x, y)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(512, generator=torch.Generator().manual_seed(1)) * 0.2)
        sae.tokens_since_fired[dead] = 10_000  # these latents are dead: AuxK trains them
    losses = sae.loss(x, y)
    losses["total"].backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


@pytest.mark.parametrize("rule", RULES)
def test_sparse_step_gradients_equal_the_dense_formulas(rule, monkeypatch):
    g = torch.Generator().manual_seed(0)
    # far from the origin, as residual streams are: a shared offset of norm 5000
    offset = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0) * 5000
    x = offset + torch.randn(256, 64, generator=g) * 40
    y = torch.randn(256, 48, generator=g) * 3 + x[:, :48] * 0.01 if "d_out" in RULES[rule] else None
    dead = torch.arange(0, 512, 3)
    monkeypatch.setattr(sae_sparse, "SPARSE_MAX_DENSITY", 1.0)  # the sparse path for every batch
    sparse_losses, sparse = step_gradients(RULES[rule], x, y, dead)
    with monkeypatch.context() as m:
        dense_kernels(m)
        dense_losses, dense = step_gradients(RULES[rule], x, y, dead)
    assert sparse.keys() == dense.keys() and {"W_dec", "b_enc", "b_dec"} <= sparse.keys()
    if rule == "jumprelu":
        assert dense["log_threshold"].abs().sum() > 0
    for name in dense:
        err = float((sparse[name] - dense[name]).norm() / dense[name].norm().clamp_min(1e-30))
        assert err < 1e-5, (name, err)
    for key in dense_losses:
        assert sparse_losses[key] == pytest.approx(dense_losses[key], rel=1e-6, abs=1e-9), key


def test_dense_codes_take_the_dense_path_and_sparse_ones_the_sparse_path():
    pre = torch.randn(100, 400)
    assert not sae_sparse.use_sparse(int((pre > 0).sum()), 100, 400)  # ReLU at initialisation: half the entries
    assert sae_sparse.use_sparse(100 * 16, 100, 400)  # TopK k = 16 of 400: 4%


def test_entries_group_by_row_and_by_latent():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    e = sae_sparse.Entries.of_mask(mask)
    table = torch.arange(9.0).view(3, 3)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])  # entries (0,0) (0,2) (2,0) (2,1)
    codes = torch.zeros(3, 3).masked_scatter(mask, weights)
    torch.testing.assert_close(e.per_row(table, weights), codes @ table)
    torch.testing.assert_close(e.per_col(table, weights), codes.T @ table)
