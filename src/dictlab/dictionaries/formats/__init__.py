"""Dictionaries in and out of the formats researchers use, behind two entries:

    load_sae(source)                  a dictlab, SAELens or sparsify folder, a sparsify checkpoint root
                                      (with hookpoint=), a Gemma Scope params.npz, or hub:OWNER/REPO/PATH;
                                      the format is told from the files
    export(folder, to, out)           a saved dictionary -> saelens | sparsify | neuronpedia

One reader and one writer per format, each in its own module (saelens.py, sparsify.py, gemma_scope.py,
neuronpedia.py); what can be written where is in WRITERS' errors, and the README's Formats table.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dictlab.data.io import atomic_folder, read_json
from dictlab.dictionaries.base import CONFIG, WEIGHTS, load_dictionary
from dictlab.dictionaries.formats.gemma_scope import PARAMS, download, read_gemma_scope
from dictlab.dictionaries.formats.neuronpedia import INTERPRETATION, write_neuronpedia
from dictlab.dictionaries.formats.saelens import is_saelens, read_saelens, write_saelens
from dictlab.dictionaries.formats.sparsify import hookpoints, is_sparsify, read_sparsify, write_sparsify
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError

__all__ = ["EXPORTS", "export", "hookpoints", "load_sae", "read_gemma_scope", "read_saelens", "read_sparsify",
           "write_saelens", "write_sparsify"]
EXPORTS = ("saelens", "sparsify", "neuronpedia")
LOOKED_FOR = (f"a dictlab folder ({CONFIG} + {WEIGHTS}), a SAELens folder (cfg.json + sae_weights.safetensors), "
              "a sparsify folder (cfg.json + sae.safetensors) or checkpoint root (one such folder per hookpoint), "
              f"a Gemma Scope {PARAMS}, or hub:OWNER/REPO/PATH")


def load_sae(source: str | Path, hookpoint: str | None = None,
             norm_scaling_factor: float | None = None) -> SparseAutoencoder:
    """The SAE or transcoder at `source`, whatever format holds it (see the module docstring); its
    `source_file` is the weights file it was read from (imports record that file's sha256)."""
    source = str(source)
    if source.startswith("hub:"):
        return read_gemma_scope(download(source))
    p = Path(source)
    if p.is_file() and p.suffix == ".npz":
        return read_gemma_scope(p)
    if not p.exists():
        raise DictlabError(f"{source} does not exist; expected {LOOKED_FOR}")
    if hookpoint is not None or (not is_sparsify(p) and hookpoints(p)):
        return read_sparsify(p, hookpoint)
    if (p / CONFIG).is_file() and (p / WEIGHTS).is_file():
        d = load_dictionary(p)
        if not isinstance(d, SparseAutoencoder):
            raise DictlabError(f"{source} holds a {d.kind} dictionary, not an SAE")
        d.source_file = p / WEIGHTS
        return d
    if is_saelens(p):
        return read_saelens(p, norm_scaling_factor)
    if is_sparsify(p):
        return read_sparsify(p)
    if (p / PARAMS).is_file():
        return read_gemma_scope(p)
    raise DictlabError(f"no SAE found at {source}: looked for {LOOKED_FOR}")


def export(folder: str | Path, to: str, out: str | Path, overwrite: bool = False, hook_name: str = "",
           **neuronpedia) -> Path:
    """Write the saved dictionary in `folder` as `to` into the folder `out` (all or nothing: on any error
    `out` is left as it was). SAELens exports carry sparsity.safetensors when interpretation.json gives
    the units' firing frequencies; `neuronpedia` options: model_id, layer, sae_set, features_per_batch."""
    if to not in EXPORTS:
        raise DictlabError(f"unknown export format {to!r}; accepted: {', '.join(EXPORTS)}")
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise DictlabError(f"{folder} holds no saved dictionary ({CONFIG} is missing)")
    if to == "neuronpedia":
        with atomic_folder(Path(out), overwrite) as tmp:
            write_neuronpedia(folder, tmp, **neuronpedia)
        return Path(out)
    d = load_dictionary(folder)
    if not isinstance(d, SparseAutoencoder):
        raise DictlabError(f"{folder} holds a {d.kind} dictionary; the {to} format holds SAEs and transcoders only. "
                           "A dictionary of any kind exports to neuronpedia")
    with atomic_folder(Path(out), overwrite) as tmp:
        if to == "saelens":
            site = read_json(folder / CONFIG).get("site", "")
            write_saelens(d, tmp, hook_name or _transformer_lens_name(site), _log10_frequency(folder))
        else:
            write_sparsify(d, tmp)
    return Path(out)


def _log10_frequency(folder: Path) -> torch.Tensor | None:
    """log10 of each unit's firing frequency + 1e-10 (as SAELens's sparsity file), from interpretation.json."""
    path = folder / INTERPRETATION
    if not path.exists():
        return None
    frequency = torch.tensor([u["frequency"] for u in read_json(path)["units"]], dtype=torch.float64)
    return torch.log10(frequency + 1e-10).float()


def _transformer_lens_name(site: str) -> str:
    """L12.resid_post -> blocks.12.hook_resid_post, SAELens's hook name for a site (others as they are)."""
    layer, _, kind = site.partition(".")
    return f"blocks.{layer[1:]}.hook_{kind}" if layer[:1] == "L" and layer[1:].isdigit() and kind else site
