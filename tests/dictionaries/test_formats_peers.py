"""Interop with the peers' own code (the [bench] extra; skipped, saying why, without it): folders written by
sparsify's and SAELens's savers read in dictlab to the numbers their own encode and forward give, and
dictlab's exports loaded by their loaders give dictlab's numbers."""

import pytest
import torch

from dictlab.dictionaries.formats import export, load_sae
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError

from .test_formats import D, L, inputs, trained_like

TOL = dict(rtol=1e-5, atol=1e-5)


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter of a peer's module drawn at random (thresholds positive, gates' r_mag small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(value.abs() + 0.05 if "threshold" in name else value)
    return module


# --- sparsify -----------------------------------------------------------------------------------
SPARSIFY = {"topk": dict(activation="topk", k=4), "groupmax": dict(activation="groupmax", k=4),
            "skip": dict(activation="topk", k=3, skip_connection=True),
            "transcoder": dict(activation="topk", k=3, transcode=True),
            "skip-transcoder": dict(activation="topk", k=3, transcode=True, skip_connection=True)}


@pytest.mark.parametrize("case", SPARSIFY)
def test_folders_saved_by_sparsify_read_as_sparsify_computes(case, tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify (the [bench] extra) is not installed")
    coder = randomized(sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=L, **SPARSIFY[case])))
    coder.save_to_disk(tmp_path / "layers.3")
    coder.save_to_disk(tmp_path / "layers.5")
    sae = load_sae(tmp_path, hookpoint="layers.3")
    x = inputs()
    with torch.no_grad():
        top = coder.encode(x)
        codes = torch.zeros(len(x), L).scatter(1, top.top_indices, top.top_acts)
        out = coder(x).sae_out
    torch.testing.assert_close(sae.encode(x), codes, **TOL)
    torch.testing.assert_close(sae.reconstruct(x, *sae.encode_sparse(x)), out, **TOL)


@pytest.mark.parametrize("kwargs", [dict(rule="topk", k=4), dict(rule="groupmax", k=4),
                                    dict(rule="topk", k=4, matryoshka=[8]),
                                    dict(rule="topk", k=3, transcoder=True, skip=True)])
def test_sparsify_loads_dictlab_exports_with_the_same_numbers(kwargs, tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify (the [bench] extra) is not installed")
    sae = trained_like(SparseAutoencoder(D, L, **kwargs))
    sae.save(tmp_path / "d", extra={"site": "L3.resid_post"})
    export(tmp_path / "d", "sparsify", tmp_path / "out")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "out")
    x = inputs()
    with torch.no_grad():
        top = coder.encode(x)
        codes = torch.zeros(len(x), L).scatter(1, top.top_indices, top.top_acts)
        out = coder(x).sae_out
    torch.testing.assert_close(codes, sae.encode(x), **TOL)
    torch.testing.assert_close(out, sae.reconstruct(x, *sae.encode_sparse(x)), **TOL)


# --- SAELens ------------------------------------------------------------------------------------
def _saelens():
    return pytest.importorskip("sae_lens", reason="sae-lens (the [bench] extra) is not installed")


SAELENS = {  # case: (class name, config options)
    "standard": ("StandardSAE", {}), "topk": ("TopKSAE", {"k": 4}),
    "topk-rescaled": ("TopKSAE", {"k": 4, "rescale_acts_by_decoder_norm": True}),
    "jumprelu": ("JumpReLUSAE", {}), "gated": ("GatedSAE", {}),
    "no-b_dec-in": ("StandardSAE", {"apply_b_dec_to_input": False}),
    "constant-norm": ("StandardSAE", {"normalize_activations": "constant_norm_rescale"}),
    "layer-norm": ("TopKSAE", {"k": 3, "normalize_activations": "layer_norm"}),
    "transcoder": ("Transcoder", {"d_out": 8, "apply_b_dec_to_input": False}),
    "skip-transcoder": ("SkipTranscoder", {"d_out": 8, "apply_b_dec_to_input": False}),
    "jumprelu-transcoder": ("JumpReLUTranscoder", {"d_out": 8, "apply_b_dec_to_input": False}),
    "jumprelu-skip-transcoder": ("JumpReLUSkipTranscoder", {"d_out": 8, "apply_b_dec_to_input": False}),
}


def _peer(sae_lens, case: str):
    name, options = SAELENS[case]
    return randomized(getattr(sae_lens, name)(getattr(sae_lens, name + "Config")(d_in=D, d_sae=L, **options)))


@pytest.mark.parametrize("case", SAELENS)
def test_folders_saved_by_saelens_read_as_saelens_computes(case, tmp_path):
    peer = _peer(_saelens(), case)
    peer.save_model(tmp_path / "sl")
    sae = load_sae(tmp_path / "sl")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), peer.encode(x), **TOL)
        torch.testing.assert_close(sae.reconstruct(x, *sae.encode_sparse(x)), peer(x), **TOL)


def test_expected_average_only_in_needs_its_factor_and_then_matches_saelens_folded(tmp_path):
    sae_lens = _saelens()
    peer = randomized(sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
        d_in=D, d_sae=L, normalize_activations="expected_average_only_in")))
    peer.save_model(tmp_path / "sl")
    with pytest.raises(DictlabError, match="needs its scaling factor \\(norm_scaling_factor\\).*--norm-scaling-factor"):
        load_sae(tmp_path / "sl")
    sae = load_sae(tmp_path / "sl", norm_scaling_factor=2.5)
    peer.fold_activation_norm_scaling_factor(2.5)  # what SAELens does with the factor it knows
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), peer.encode(x), **TOL)
        torch.testing.assert_close(sae.reconstruct(x, *sae.encode_sparse(x)), peer(x), **TOL)


@pytest.mark.parametrize("kwargs", [dict(rule="relu"), dict(rule="topk", k=4), dict(rule="batchtopk", k=4),
                                    dict(rule="jumprelu"), dict(rule="gated"), dict(rule="topk", k=4, matryoshka=[6]),
                                    dict(rule="relu", d_out=8), dict(rule="jumprelu", d_out=8, skip=True),
                                    dict(rule="relu", normalize="layer_norm")])
def test_saelens_loads_dictlab_exports_with_the_same_numbers(kwargs, tmp_path):
    sae_lens = _saelens()
    sae = trained_like(SparseAutoencoder(D, L, **kwargs))
    sae.save(tmp_path / "d", extra={"site": "L3.resid_post"})
    export(tmp_path / "d", "saelens", tmp_path / "out")
    peer = sae_lens.SAE.load_from_disk(tmp_path / "out")
    assert peer.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(peer.encode(x), sae.encode(x), **TOL)
        torch.testing.assert_close(peer(x), sae.reconstruct(x, *sae.encode_sparse(x)), **TOL)
