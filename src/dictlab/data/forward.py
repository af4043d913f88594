"""Cheaper forward passes for many edited variants of one batch (the CE stage, steering): the layers
before the edits run once (`SharedPrefix`), and the unembedding runs by vocabulary blocks
(`logit_blocks`), each reduced while in cache instead of building [tokens, vocabulary] logits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dictlab.data.lm import ARCHITECTURES, ActivationCapture, Site, soft_capped
from dictlab.errors import DictlabError


def logit_blocks(model, hidden: torch.Tensor, block: int = 8192) -> Iterator[tuple[int, torch.Tensor]]:
    """(first token id, float32 logits [N, ≤ block]) of final hidden states [N, d], one vocabulary block at a
    time, as the model's own head computes them (its dtype; then Gemma 2's soft-capping where configured):
    a block's logits stay in cache for whatever reduces them, and the [N, V] logits need not exist."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    hidden = hidden.to(weight.dtype)
    for start in range(0, weight.shape[0], block):
        logits = (hidden @ weight[start:start + block].T).float()
        if bias is not None:
            logits += bias[start:start + block].float()
        yield start, soft_capped(model, logits)


class SharedPrefix:
    """Layers before `start` (≥ 1) run once for many edited forwards: inside `recording()` a forward keeps
    what layer start − 1 returned; inside `resumed()` layers 0..start − 1 do no work and return that kept
    output, so layer `start` and the rest run as in a full forward (the model's own masks and position
    embeddings, every hook on those layers), and give its result bitwise (tested per architecture). The
    layers stay in place: some models pick a layer's attention mask by its position in the list."""

    def __init__(self, model, start: int):
        if start < 1:
            raise DictlabError(f"a shared prefix needs at least one layer before layer {start}")
        self.layers = list(model.get_submodule(ARCHITECTURES[model.config.model_type].layers))
        self.start, self.output = start, None

    @contextlib.contextmanager
    def recording(self):
        def keep(_module, _args, output):
            self.output = output

        handle = self.layers[self.start - 1].register_forward_hook(keep)
        try:
            yield self
        finally:
            handle.remove()

    @contextlib.contextmanager
    def resumed(self):
        def kept(*_args, **_kwargs):
            return self.output

        skipped = self.layers[:self.start]
        for layer in skipped:
            layer.forward = kept  # an instance attribute: nn.Module's call finds it before the class's forward
        try:
            yield self
        finally:
            for layer in skipped:
                del layer.forward

    @staticmethod
    def first_layer(model, sites: list[Site]) -> int | None:
        """The earliest layer any of these sites lies in (None: a site outside the mapped layers, or an
        unmapped architecture, where no prefix can be shared)."""
        capture = ActivationCapture(model, [])
        if capture.arch is None:
            return None
        layers = [s.layer if s.module is None else capture._layer_of_path(s.module) for s in sites]
        return None if not layers or None in layers else min(layers)
