"""`steps: auto`: SAEs train until their validation loss plateaus, within a budget, and say which it was."""

import math

import pytest
import torch
from pydantic import ValidationError

from dictlab.dictionaries import SAEFit
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.dictionaries.train import Plateau, TrainConfig, tensor_batches, train, train_sweep
from dictlab.errors import DictlabError
from tests.dictionaries.test_sae import planted


def noisy(n, seed):
    """Sparse combinations of 64 atoms plus isotropic noise of std 0.3: no dictionary of 3-sparse codes
    reconstructs below the noise left in the 29 dimensions the codes cannot reach, so the loss plateaus."""
    codes, truth = planted(n=n, d=32, atoms=64, active=3, seed=0)
    g = torch.Generator().manual_seed(seed)
    return codes @ truth + 0.3 * torch.randn(n, 32, generator=g)


def auto(budget, **plateau):
    return TrainConfig(steps=budget, lr=1e-2, warmup_steps=20, plateau=Plateau(**{"every": 10, **plateau}))


def test_a_loss_with_a_floor_stops_on_its_plateau_then_decays():
    x, held_out = noisy(8000, 1), noisy(2000, 2)
    sae = SparseAutoencoder(32, 128, rule="topk", k=3, seed=1)
    history = train(sae, tensor_batches(x, 256), auto(3000), progress=False, log_every=50,
                    validation=(held_out, None))
    ending = sae.convergence_
    t = ending["plateau_step"]
    assert ending["converged"] and t % 10 == 0 and 100 <= t < 0.8 * 3000
    assert ending["steps"] == t + math.ceil(t * 0.2 / 0.8) and ending["tokens_seen"] == ending["steps"] * 256
    assert history[-1]["step"] == ending["steps"] - 1 and history[-1]["lr"] == pytest.approx(0, abs=1e-5)
    # the rule's own condition held at its step, and had not at the check before
    losses = dict(ending["validation"])

    def reference(step):  # the loss measured nearest below 80% of the step
        return [v for s, v in sorted(losses.items()) if 0 < s <= 0.8 * step][-1]

    assert losses[t] > (1 - 0.01) * reference(t)
    assert losses[t - 10] <= (1 - 0.01) * reference(t - 10)
    # and the SAE it left is as good as one trained twice as long, on rows neither saw
    long = SparseAutoencoder(32, 128, rule="topk", k=3, seed=1)
    train(long, tensor_batches(x, 256), TrainConfig(steps=2 * ending["steps"], lr=1e-2, warmup_steps=20),
          progress=False)
    def err(s):
        return float((s.decode_sparse(*s.encode_sparse(held_out)) - held_out).square().sum(1).mean())
    assert err(sae) <= 1.03 * err(long)
    assert long.convergence_["converged"] is None  # a fixed length gives no verdict


def test_a_budget_that_runs_out_first_is_recorded_as_such():
    x, held_out = noisy(4000, 1), noisy(1000, 2)
    sae = SparseAutoencoder(32, 128, rule="topk", k=3, seed=1)
    train_sweep([sae], tensor_batches(x, 256), auto(60), progress=False, validation=(held_out, None))
    assert sae.convergence_["converged"] is False and sae.convergence_["steps"] == 60
    assert sae.convergence_["validation"][-1][0] == 60  # the final loss is recorded too


def test_the_members_of_a_sweep_stop_each_on_its_own_plateau():
    x, held_out = noisy(8000, 1), noisy(2000, 2)
    saes = [SparseAutoencoder(32, 128, rule="topk", k=3, seed=1), SparseAutoencoder(32, 16, rule="topk", k=1, seed=1)]
    train_sweep(saes, tensor_batches(x, 256), auto(3000), progress=False, validation=(held_out, None))
    ends = [s.convergence_["steps"] for s in saes]
    assert all(s.convergence_["converged"] for s in saes) and ends[0] != ends[1]


def test_the_stopping_rule_refuses_what_it_cannot_use():
    with pytest.raises(DictlabError, match="needs validation rows"):
        train_sweep([SparseAutoencoder(8, 16, k=2)], tensor_batches(torch.randn(100, 8), 10), auto(5),
                    progress=False)
    with pytest.raises(ValidationError, match="steps: auto needs max_tokens"):
        SAEFit(max_tokens=None)
    with pytest.raises(ValidationError, match="plateau_window"):
        SAEFit(plateau_window=0)
    assert SAEFit(steps=100, max_tokens=None).most_work() == 100  # a number of steps needs no budget
    assert SAEFit(max_tokens=10_000, batch_size=4096).most_work() == 2

    class FourShards:  # a store's row counts: 4 shards of 100 training rows
        def shards(self, split):
            return ["a", "b", "c", "d"]

        def rows(self, split, world=None, shard_rows=None):
            return 400

    assert SAEFit(validation_tokens=40).training_rows(FourShards()) == slice(10, None)
    with pytest.raises(DictlabError, match="validation_tokens=400 leaves no training rows: the train split holds 400"):
        SAEFit(validation_tokens=400).training_rows(FourShards())
