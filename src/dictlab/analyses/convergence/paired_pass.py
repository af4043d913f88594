"""One model's forward passes for a convergence run: over the paired text, the residual stream at the
chosen layers and the top-k next-token distribution at the chosen positions of each document; over
prompts, the residual stream at given layers at every prompt token.

The whole decoder runs once per batch; the unembedding only on the chosen rows, in float32 (for
Gemma 3's 262k-token vocabulary it costs more than the decoder). Rows are document-major, positions
sorted within a document; `rows_of` finds given (document, position) pairs among them.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from dictlab.data.lm import ActivationCapture, make_sites, next_token_logits
from dictlab.data.paired_text import ModelText
from dictlab.data.placement import model_device
from dictlab.measures.downstream import padded_batches


@torch.no_grad()
def text_pass(model, text: ModelText, positions: list[np.ndarray], layers: list[int], top_k: int = 64,
              batch_size: int = 8, pad: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """{"doc", "pos": [R], "L<l>": [R, d] float32 per layer, "top_ids" [R, k], "top_probs" [R, k]} at
    `positions[d]` (sorted unique positions of document d's context)."""
    capture = ActivationCapture(model, make_sites(layers, ["resid_post"]))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("doc", "pos", "top_ids", "top_probs",
                                                            *(f"L{layer}" for layer in layers))}
    n_docs, device = len(text.ids), model_device(model)
    batches = padded_batches([torch.tensor(ids) for ids in text.ids], batch_size, pad, device)
    for start, (ids, mask) in tqdm(zip(range(0, n_docs, batch_size), batches), total=-(-n_docs // batch_size),
                                   desc="forward passes", disable=not progress, dynamic_ncols=True):
        docs = list(range(start, start + len(ids)))
        captured, final = capture.run_to_final(ids, mask)
        batch_row = torch.cat([torch.full((len(positions[d]),), i) for i, d in enumerate(docs)])
        batch_pos = torch.cat([torch.as_tensor(positions[d], dtype=torch.long) for d in docs])
        on_device = batch_row.to(device), batch_pos.to(device)
        probs = next_token_logits(model, final[on_device]).softmax(-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        parts["doc"].append(torch.tensor(docs)[batch_row])
        parts["pos"].append(batch_pos)
        parts["top_ids"].append(top.indices.cpu())
        parts["top_probs"].append(top.values.float().cpu())
        for layer in layers:
            parts[f"L{layer}"].append(captured[f"L{layer}.resid_post"][on_device].float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def rows_of(result: dict[str, torch.Tensor], docs: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """Row indices in a text_pass result of the (document, position) pairs (any shape; every pair present)."""
    width = int(result["pos"].max()) + 1
    keys = result["doc"].numpy().astype(np.int64) * width + result["pos"].numpy()
    wanted = np.asarray(docs, dtype=np.int64) * width + np.asarray(positions, dtype=np.int64)
    found = np.searchsorted(keys, wanted.ravel())
    if np.any(found >= len(keys)) or np.any(keys[np.minimum(found, len(keys) - 1)] != wanted.ravel()):
        raise ValueError("some (document, position) pairs were not captured by this pass")
    return torch.as_tensor(found.reshape(np.shape(wanted)))


@torch.no_grad()
def prompt_pass(model, prompts_ids: list[list[int]], layers: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per prompt: {"L<l>": [T − 1, d]} at every token after the start token (a prompt at a time)."""
    capture = ActivationCapture(model, make_sites(layers, ["resid_post"]))
    out = []
    for ids in prompts_ids:
        captured = capture.run(torch.tensor([ids], device=model_device(model)), stop_early=True)
        out.append({f"L{layer}": captured[f"L{layer}.resid_post"][0, 1:].float().cpu() for layer in layers})
    return out
