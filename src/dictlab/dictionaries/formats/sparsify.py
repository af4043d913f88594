"""EleutherAI sparsify folders: `cfg.json` (activation topk | groupmax, num_latents — 0 meaning
d_in × expansion_factor —, k, normalize_decoder, multi_topk, skip_connection, transcode, d_in) and
`sae.safetensors` (encoder.weight [L, d_in], encoder.bias [L], W_dec [L, d_in], b_dec [d_in], W_skip
[d_in, d_in] with a skip connection). A checkpoint root holds one such folder per hookpoint (`layers.10/`).

sparsify's encode: x − b_dec (not for a transcoder), then ReLU(x Wᵀ + b), then the k largest (topk) or
the largest of each of k equal contiguous groups (groupmax); decode: a W_dec + b_dec, plus x W_skipᵀ of
the raw input with a skip connection. Input and output widths are equal, transcoders included.
`multi_topk` changes only sparsify's training loss.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from dictlab.data.io import write_json
from dictlab.dictionaries.formats.common import checked, choice, field, filled, folded, read_config, read_tensors
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"
ACTIVATIONS = ("topk", "groupmax")


def is_sparsify(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def hookpoints(root: Path) -> list[str]:
    """The hookpoints a sparsify checkpoint root holds (its sub-folders that are sparsify folders), sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_sparsify(p)) if root.is_dir() else []


def read_sparsify(folder: str | Path, hookpoint: str | None = None) -> SparseAutoencoder:
    folder = Path(folder)
    if hookpoint is not None or not is_sparsify(folder):
        held = hookpoints(folder)
        if hookpoint is None:
            if len(held) != 1:
                raise DictlabError(f"{folder} is a sparsify checkpoint root holding {len(held)} hookpoints "
                                   f"({', '.join(held) or 'none'}); name one (--hookpoint)")
            hookpoint = held[0]
        if hookpoint not in held:
            raise DictlabError(f"hookpoint {hookpoint!r} is not in {folder}; it holds: {', '.join(held) or 'none'}")
        folder = folder / hookpoint
    cfg_path = folder / CONFIG
    cfg = read_config(cfg_path)
    activation = choice(cfg, "activation", cfg_path, ACTIVATIONS, default="topk")
    d_in, k = field(cfg, "d_in", cfg_path), field(cfg, "k", cfg_path)
    latents = field(cfg, "num_latents", cfg_path, default=0) or d_in * field(cfg, "expansion_factor", cfg_path)
    transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    expected = {"encoder.weight": (latents, d_in), "encoder.bias": (latents,), "W_dec": (latents, d_in),
                "b_dec": (d_in,)}
    if skip:
        expected["W_skip"] = (d_in, d_in)
    t = checked(read_tensors(folder / WEIGHTS), expected, folder / WEIGHTS)
    if not 1 <= k <= latents:
        raise DictlabError(f"{cfg_path}: k={k} must lie in 1..num_latents ({latents})")
    sae = SparseAutoencoder(d_in, latents, rule=activation, k=k, transcoder=transcode, skip=skip,
                            apply_b_dec_to_input=not transcode, normalize_decoder=False)
    tensors = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if skip:
        tensors["W_skip"] = t["W_skip"]
    sae.source_file = folder / WEIGHTS  # what an import hashes and records
    return filled(sae, tensors)


def write_sparsify(sae: SparseAutoencoder, folder: Path) -> Path:
    """Write the SAE into `folder` (an existing empty or temporary folder: see formats.export)."""
    hp = sae.hparams
    if hp["rule"] not in ACTIVATIONS:
        raise DictlabError(f"sparsify holds top-k and group-max coders, not {hp['rule']}; write this SAE as saelens")
    if sae.d_in != sae.d_model:
        raise DictlabError(f"sparsify coders have equal input and output widths; this transcoder maps {sae.d_in} to "
                           f"{sae.d_model}: keep it as a dictlab folder")
    if hp["normalize"] != "none":
        raise DictlabError(f"sparsify has no input normalisation ({hp['normalize']}); write this SAE as saelens")
    if hp["transcoder"] == hp["apply_b_dec_to_input"]:
        raise DictlabError("sparsify subtracts b_dec from an SAE's input and not from a transcoder's; this one "
                           "does otherwise: write it as saelens")
    f = folded(sae)
    tensors = {"encoder.weight": f["W_enc"].T.contiguous(), "encoder.bias": f["b_enc"], "W_dec": f["W_dec"],
               "b_dec": f["b_dec"]}
    if hp["skip"]:
        tensors["W_skip"] = f["W_skip"]
    save_file(tensors, str(folder / WEIGHTS))
    write_json(folder / CONFIG, {"activation": hp["rule"], "expansion_factor": max(1, sae.n_latents // sae.d_in),
                                 "normalize_decoder": bool(hp["normalize_decoder"]), "num_latents": sae.n_latents,
                                 "k": hp["k"], "multi_topk": False, "skip_connection": bool(hp["skip"]),
                                 "transcode": bool(hp["transcoder"]), "d_in": sae.d_in})
    return folder
