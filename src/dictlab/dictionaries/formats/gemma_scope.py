"""Gemma Scope: a `params.npz` (read without pickles) with W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc, b_dec and threshold; encode = ReLU(x W_enc + b_enc) where it exceeds the threshold, x not centred
by b_dec. Also `hub:OWNER/REPO/PATH`, a hub folder holding params.npz (needs a reachable hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dictlab.dictionaries.formats.common import checked, filled
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError

PARAMS = "params.npz"


def read_gemma_scope(path: str | Path) -> SparseAutoencoder:
    path = Path(path)
    if path.is_dir():
        path = path / PARAMS
    if not path.exists():
        raise DictlabError(f"{path} not found (a Gemma Scope SAE is a {PARAMS} file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {n: np.asarray(data[n]) for n in data.files}
    except (ValueError, OSError) as e:
        raise DictlabError(f"{path}: not a readable .npz file ({e})") from e
    if "W_enc" not in arrays or arrays["W_enc"].ndim != 2:
        raise DictlabError(f"{path}: missing tensors ['W_enc'] of 2 dimensions (found {sorted(arrays)})")
    d_in, d_sae = arrays["W_enc"].shape
    tensors = {n: torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a) for n, a in arrays.items()}
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                "threshold": (d_sae,)}
    sae = SparseAutoencoder(d_in, d_sae, rule="jumprelu", apply_b_dec_to_input=False, normalize_decoder=False)
    sae.source_file = path  # what an import hashes and records
    return filled(sae, checked(tensors, expected, path))


def download(source: str) -> Path:
    """hub:OWNER/REPO/PATH -> the local copy of PATH/params.npz."""
    repo_and_path = source[4:].strip("/").split("/")
    if len(repo_and_path) < 3:
        raise DictlabError(f"{source!r}: expected hub:OWNER/REPO/PATH/TO/FOLDER")
    repo, path = "/".join(repo_and_path[:2]), "/".join(repo_and_path[2:])
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, f"{path}/{PARAMS}"))
    except Exception as e:  # offline, missing repo or file: huggingface_hub has many error types
        raise DictlabError(f"could not download {path}/{PARAMS} from {repo}: {e}") from e
