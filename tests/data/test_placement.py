"""Where the stages after extraction compute: the shared model on the process's device, and contexts per
forward pass from free device memory (a GPU's free memory is stood in for: these machines have none)."""

import pytest
import torch

from dictlab.data import distributed, lm, placement
from dictlab.errors import DictlabError


def test_the_shared_model_is_placed_where_the_process_computes(tiny_models, monkeypatch):
    monkeypatch.setattr(distributed, "device", lambda: torch.device("meta"))  # stands in for a GPU
    lm.shared_model.cache_clear()
    try:
        model, _ = lm.shared_model(str(tiny_models["llama"]), "float32")
        assert placement.model_device(model).type == "meta"
        assert all(p.device.type == "meta" for p in model.parameters())
    finally:
        lm.shared_model.cache_clear()


def test_contexts_per_batch_fill_half_the_free_device_memory(tiny_models, monkeypatch):
    model, _ = lm.load_model(str(tiny_models["llama"]))
    assert placement.contexts_per_batch(model, 128) == placement.CPU_CONTEXTS  # a CPU: the small default
    assert placement.contexts_per_batch(model, 128, 7) == 7  # a number given wins
    per_context = placement.context_bytes(model, 128)
    assert placement.context_bytes(model, 128, backward=True) == 3 * per_context
    assert placement.context_bytes(model, 256) > 2 * per_context  # attention grows with the square
    monkeypatch.setattr(placement, "model_device", lambda m: torch.device("cuda", 0))
    for free, expected in ((2 * 10 * per_context + 5, 10), (10, 1), (1 << 50, placement.MOST_CONTEXTS)):
        monkeypatch.setattr(placement, "free_bytes", lambda device, free=free: free)
        assert placement.contexts_per_batch(model, 128) == expected
    for bad in (0, -3, "many"):
        with pytest.raises(DictlabError, match="positive integer or 'auto'"):
            placement.contexts_per_batch(model, 128, bad)


def test_context_bytes_hold_the_logits_of_every_token():
    class Config:
        vocab_size, intermediate_size, num_attention_heads, hidden_size = 262_144, 2048, 4, 640

    class Model:
        config = Config()

    # Gemma 3 270M, 128 tokens: the float32 logits alone are 128 x 262144 x 4 bytes (134 MB), kept and reduced
    assert 2 * 128 * 262_144 * 4 <= placement.context_bytes(Model(), 128) < 3 * 128 * 262_144 * 4


def test_batches_move_to_the_device_whole():
    batches = [torch.ones(2, 3), (torch.ones(2), torch.zeros(2)), {"x": torch.ones(2, 3), "token": torch.ones(2)}]
    moved = list(placement.to_device(batches, torch.device("meta")))
    assert moved[0].device.type == "meta"
    assert all(t.device.type == "meta" for t in moved[1]) and isinstance(moved[1], tuple)
    assert set(moved[2]) == {"x", "token"} and all(t.device.type == "meta" for t in moved[2].values())
