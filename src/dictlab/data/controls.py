"""Model controls: the same architecture and tokenizer as a model, with something taken away, so that
what a dictionary finds on the trained model can be told from what any model of that shape gives.

    random_weights   the weights drawn afresh by the model's own initialisation scheme (transformers'
                     `from_config`: its `initializer_range`, its norm and embedding rules), seeded

A control travels inside the model spec as `MODEL+CONTROL:SEED` (e.g. `gemma3-270m+random_weights:0`),
so the store's spec and manifest record it and every later stage (CE loss, interpretation, steering)
loads the same control model from the store.
"""

from __future__ import annotations

import torch

from dictlab.errors import DictlabError

CONTROLS = ("random_weights",)


def with_control(model: str, control: str | None, seed: int = 0) -> str:
    """The model spec of a control run (the model itself without a control)."""
    if control is None:
        return model
    if control not in CONTROLS:
        raise DictlabError(f"unknown control {control!r}; accepted: {', '.join(CONTROLS)}")
    return f"{model}+{control}:{seed}"


def split_control(spec: str) -> tuple[str, str | None, int]:
    """(model, control or None, seed) of a model spec."""
    model, plus, rest = spec.rpartition("+")
    if not plus or ":" not in rest:
        return spec, None, 0
    control, _, seed = rest.partition(":")
    if control not in CONTROLS:
        return spec, None, 0  # a '+' that is part of a path or a hub id
    try:
        return model, control, int(seed)
    except ValueError:
        raise DictlabError(f"model spec {spec!r}: the seed after '{control}:' must be an integer") from None


def random_weights(where, dtype: torch.dtype, seed: int):
    """The model at `where`, architecture only: freshly initialised by its own scheme with `seed`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(where)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
