"""SAELens folders: `cfg.json` and `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_out],
b_enc [d_sae], b_dec [d_out]; threshold [d_sae] for JumpReLU; b_gate, b_mag, r_mag for gated SAEs, whose
b_mag is dictlab's b_enc; W_skip [d_out, d_in] for skip transcoders; topk_threshold for a BatchTopK
training SAE), and `sparsity.safetensors` beside them (`sparsity`: log10 of each latent's firing
frequency + 1e-10).

Read: every architecture below, `apply_b_dec_to_input`, and every `normalize_activations` that needs no
dataset statistics — none, constant_norm_rescale and layer_norm (per row, undone on the output), and
expected_average_only_in with its scaling factor (the input multiplied by it, which is dictlab's input
scale), taken from the call or from cfg.json's `norm_scaling_factor`. A TopK SAE with
`rescale_acts_by_decoder_norm` is read with the decoder norms folded in (codes and outputs unchanged).

Write: relu as standard, topk, jumprelu, gated, a BatchTopK as jumprelu with its one threshold, Matryoshka
SAEs as their rule, transcoders as (jumprelu_)(skip_)transcoder; normalisations as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dictlab.data.io import write_json
from dictlab.dictionaries.formats.common import (
    checked,
    choice,
    export_threshold,
    field,
    filled,
    folded,
    read_config,
    read_tensors,
)
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError

CONFIG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
# architecture -> (dictlab rule, transcoder, skip)
ARCHITECTURES = {"standard": ("relu", False, False), "relu": ("relu", False, False), "topk": ("topk", False, False),
                 "batchtopk": ("batchtopk", False, False), "jumprelu": ("jumprelu", False, False),
                 "gated": ("gated", False, False), "transcoder": ("relu", True, False),
                 "skip_transcoder": ("relu", True, True), "jumprelu_transcoder": ("jumprelu", True, False),
                 "jumprelu_skip_transcoder": ("jumprelu", True, True)}
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
RULES_WRITTEN = ("relu", "topk", "batchtopk", "jumprelu", "gated")


def is_saelens(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def read_saelens(folder: str | Path, norm_scaling_factor: float | None = None) -> SparseAutoencoder:
    folder = Path(folder)
    cfg_path = folder / CONFIG
    if not cfg_path.exists():
        raise DictlabError(f"{folder} is not a SAELens folder: {CONFIG} is missing")
    cfg = read_config(cfg_path)
    arch = choice(cfg, "architecture", cfg_path, ARCHITECTURES, default="standard")
    rule, transcoder, skip = ARCHITECTURES[arch]
    norm = choice(cfg, "normalize_activations", cfg_path, NORMALIZATIONS, default="none")
    d_in, d_sae = field(cfg, "d_in", cfg_path), field(cfg, "d_sae", cfg_path)
    d_out = field(cfg, "d_out", cfg_path) if transcoder else d_in
    scale = 1.0
    if norm == "expected_average_only_in":
        scale = norm_scaling_factor or cfg.get("norm_scaling_factor")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise DictlabError(f"{cfg_path}: normalize_activations 'expected_average_only_in' needs its scaling "
                               "factor (norm_scaling_factor), which neither the folder nor the call gives: pass "
                               "--norm-scaling-factor (SAELens lists it per SAE in its pretrained_saes.yaml)")
        norm = "none"
    k = 1
    if rule in ("topk", "batchtopk"):  # SAELens before 6.0 kept k in activation_fn_kwargs
        k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0)
        if k < 1:
            raise DictlabError(f"{cfg_path}: field 'k' is missing (a {arch} SAE needs it)")
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    gated = {"b_mag": (d_sae,), "b_gate": (d_sae,), "r_mag": (d_sae,)}
    expected.update(gated if rule == "gated" else {"b_enc": (d_sae,)})
    if rule == "jumprelu":
        expected["threshold"] = (d_sae,)
    if rule == "batchtopk":
        expected["topk_threshold"] = ()
    if skip:
        expected["W_skip"] = (d_out, d_in)
    tensors = checked(read_tensors(folder / WEIGHTS), expected, folder / WEIGHTS)
    if rule == "gated":
        tensors["b_enc"] = tensors.pop("b_mag")
    if rule == "batchtopk":
        tensors["batch_threshold"] = tensors.pop("topk_threshold")
    if rule == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].norm(dim=1)  # codes scaled by ‖d_j‖, decoder rows by 1/‖d_j‖
        tensors["W_enc"], tensors["b_enc"], tensors["W_dec"] = (
            tensors["W_enc"] * norms, tensors["b_enc"] * norms, tensors["W_dec"] / norms[:, None])
    apply_b_dec = False if transcoder else bool(cfg.get("apply_b_dec_to_input", True))
    sae = SparseAutoencoder(d_in, d_sae, rule=rule, k=k, d_out=d_out, transcoder=transcoder, skip=skip,
                            apply_b_dec_to_input=apply_b_dec, normalize_decoder=False, normalize=norm)
    sae.input_scale.fill_(float(scale))
    sae.source_file = folder / WEIGHTS  # what an import hashes and records
    return filled(sae, tensors)


def write_saelens(sae: SparseAutoencoder, folder: Path, hook_name: str = "",
                  log10_frequency: torch.Tensor | None = None) -> Path:
    """Write the SAE into `folder` (an existing empty or temporary folder: see formats.export)."""
    hp = sae.hparams
    if hp["rule"] not in RULES_WRITTEN:
        raise DictlabError(f"the SAELens format holds no {hp['rule']} rule; write this SAE as sparsify")
    transcoder = hp["transcoder"]
    if transcoder and hp["rule"] not in ("relu", "jumprelu"):
        raise DictlabError(f"SAELens transcoders are ReLU or JumpReLU, not {hp['rule']}; write this one as sparsify "
                           "(top-k, input width = output width) or keep it as a dictlab folder")
    if hp["skip"] and not transcoder:
        raise DictlabError("SAELens holds skip connections in transcoders only; write this SAE as sparsify")
    tensors = folded(sae)
    jump = hp["rule"] in ("jumprelu", "batchtopk")
    if jump:
        tensors["threshold"] = export_threshold(sae)
    if hp["rule"] == "gated":
        tensors["b_mag"] = tensors.pop("b_enc")
    if transcoder:
        arch = ("jumprelu_" if jump else "") + ("skip_" if hp["skip"] else "") + "transcoder"
    else:
        arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}.get(hp["rule"], hp["rule"])
    save_file(tensors, str(folder / WEIGHTS))
    cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": hp["apply_b_dec_to_input"], "normalize_activations": hp["normalize"],
           "reshape_activations": "none", "metadata": {"hook_name": hook_name, "sae_lens_version": "6.0.0"}}
    if transcoder:
        cfg["d_out"] = sae.d_model
    if arch == "topk":
        cfg["k"] = hp["k"]
    write_json(folder / CONFIG, cfg)
    if log10_frequency is not None:
        save_file({"sparsity": log10_frequency.float().contiguous()}, str(folder / SPARSITY))
    return folder
