from itertools import islice

import pytest
import torch

from dictlab.dictionaries import load_dictionary
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.dictionaries.train import TrainConfig, tensor_batches, train, train_sweep
from dictlab.errors import DictlabError


def planted(n=20_000, d=32, atoms=64, active=3, seed=0):
    """Rows that are sparse non-negative combinations of unit-norm ground-truth atoms."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    codes = torch.zeros(n, atoms).scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes, dictionary


def recovered(decoder: torch.Tensor, truth: torch.Tensor) -> float:
    cos = torch.nn.functional.normalize(decoder.detach(), dim=1) @ truth.T
    return float((cos.max(0).values > 0.9).float().mean())


VARIANTS = {
    "topk": dict(rule="topk", k=3),
    "batchtopk": dict(rule="batchtopk", k=3),
    "relu": dict(rule="relu", l1_coeff=1.0),
    "jumprelu": dict(rule="jumprelu", l0_coeff=1.0, bandwidth=0.1, jumprelu_init=0.5),
    "matryoshka": dict(rule="batchtopk", k=3, matryoshka=[64]),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_recovers_a_planted_dictionary(variant):
    codes, truth = planted()
    x = codes @ truth
    sae = SparseAutoencoder(32, 128, seed=1, dead_tokens=20_000, **VARIANTS[variant])
    history = train(sae, tensor_batches(x, 256), TrainConfig(steps=1500, lr=3e-3, warmup_steps=50), progress=False)
    assert recovered(sae.W_dec, truth) >= 0.9
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))  # decoder rows stay unit norm
    assert history[-1]["mse"] < history[0]["mse"]


@pytest.mark.parametrize("variant", ["topk", "jumprelu", "matryoshka"])
def test_bf16_autocast_training_recovers_the_dictionary_too(variant):
    # the path a GPU (and a CPU with native bf16) takes (bf16_autocast): the same code under CPU autocast
    codes, truth = planted(n=8000)
    x = codes @ truth
    cfg = TrainConfig(steps=600, lr=3e-3, warmup_steps=50, autocast="bfloat16")
    sae = SparseAutoencoder(32, 128, seed=1, dead_tokens=2000, **VARIANTS[variant])
    history = train(sae, tensor_batches(x, 256), cfg, progress=False, log_every=50)
    assert all(p.dtype == torch.float32 for p in sae.parameters())  # master weights and Adam stay float32
    assert recovered(sae.W_dec, truth) >= 0.8 and history[-1]["mse"] < 0.2 * history[0]["mse"]
    if variant == "topk":
        assert max(h["aux"] for h in history) > 0  # AuxK's bf16 codes ran too


def test_topk_has_l0_exactly_k_and_batchtopk_k_on_average():
    x = torch.randn(64, 16)
    topk = SparseAutoencoder(16, 40, rule="topk", k=5)
    topk.b_enc.data += 10  # every pre-activation positive, so exactly k survive
    values, idx = topk.encode_sparse(x)
    assert idx.shape == (64, 5) and bool((values > 0).all())
    assert torch.equal((topk.encode(x) != 0).sum(1), torch.full((64,), 5))
    batch = SparseAutoencoder(16, 40, rule="batchtopk", k=5)
    batch.b_enc.data += 10
    acts = batch.activate(batch.pre_activations(x), training=True)
    assert int((acts != 0).sum()) == 5 * 64 and (acts != 0).sum(1).float().std() > 0  # varies per row


def test_jumprelu_threshold_gets_gradients_from_both_terms():
    sae = SparseAutoencoder(8, 16, rule="jumprelu", jumprelu_init=0.5, bandwidth=1.0)
    x = torch.randn(256, 8)
    sae.loss(x)["total"].backward()
    assert sae.log_threshold.grad is not None and bool((sae.log_threshold.grad != 0).any())
    sae.zero_grad()
    sae.loss(x)["sparsity"].backward()  # the L0 term alone pushes thresholds up (gradient < 0 on θ)
    assert bool((sae.log_threshold.grad <= 0).all()) and bool((sae.log_threshold.grad < 0).any())


def test_matryoshka_loss_is_the_sum_over_prefixes():
    sae = SparseAutoencoder(6, 12, rule="topk", k=4, matryoshka=[3, 7], seed=2)
    x = torch.randn(10, 6)
    acts = sae.activate(sae.pre_activations(x), training=True)
    expected = sum(((x - (acts[:, :m] @ sae.W_dec[:m] + sae.b_dec)) ** 2).sum(1).mean() for m in (3, 7, 12))
    torch.testing.assert_close(sae.loss(x)["recon"], expected)


def test_transcoder_learns_a_planted_map_between_two_sites():
    codes, source = planted(n=20_000, d=24, atoms=48)
    target = torch.nn.functional.normalize(torch.randn(48, 40, generator=torch.Generator().manual_seed(9)), dim=1)
    x, y = codes @ source, codes @ target  # one sparse cause, written differently at two sites
    tc = SparseAutoencoder(24, 96, rule="topk", k=3, d_out=40, seed=1, dead_tokens=20_000)
    train(tc, tensor_batches(x, 256, y=y), TrainConfig(steps=1500, lr=3e-3, warmup_steps=50), progress=False)
    y_hat = tc.decode(tc.encode(x))
    fvu = float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    assert fvu < 0.1 and recovered(tc.W_dec, target) >= 0.9


def test_dictionary_interface_and_save_load(tmp_path):
    x = torch.randn(50, 10) * 7 + 3
    sae = SparseAutoencoder(10, 30, rule="relu", seed=4)
    sae.initialize_from_data(x)
    s = sae.input_scale
    manual = (torch.relu(((x * s - sae.b_dec) @ sae.W_enc + sae.b_enc)) @ sae.W_dec + sae.b_dec) / s
    torch.testing.assert_close(sae.decode(sae.encode(x)), manual.detach())
    sae.save(tmp_path / "sae")
    back = load_dictionary(tmp_path / "sae")
    assert isinstance(back, SparseAutoencoder) and torch.equal(back.encode(x), sae.encode(x))


def test_bad_inputs():
    with pytest.raises(DictlabError, match="k=50 must be between 1 and the number of latents \\(20\\)"):
        SparseAutoencoder(8, 20, rule="topk", k=50)
    with pytest.raises(DictlabError, match="unknown SAE rule 'tanh'; accepted: relu, topk, batchtopk, jumprelu, gated"):
        SparseAutoencoder(8, 20, rule="tanh")
    with pytest.raises(DictlabError, match="unknown input normalisation 'whiten'; accepted: none"):
        SparseAutoencoder(8, 20, k=4, normalize="whiten")
    sae = SparseAutoencoder(8, 20, k=4)
    with pytest.raises(DictlabError, match=r"expected \[N, 8\]"):
        sae.encode(torch.randn(3, 9))
    tensors = sae.tensors()
    tensors["W_dec"] = torch.zeros(20, 7)
    with pytest.raises(DictlabError, match="W_dec.*\\(20, 7\\).*\\(20, 8\\)"):
        SparseAutoencoder.from_saved(tensors, sae.config())
    del tensors["b_enc"]
    with pytest.raises(DictlabError, match="lacks tensors.*b_enc"):
        SparseAutoencoder.from_saved(tensors, sae.config())


# --- checkpoints --------------------------------------------------------------------------------
def test_resume_after_sigkill_ends_with_identical_weights(tmp_path, pile_dir, tiny_models, write_run_config,
                                                          kill_when_written):
    import json
    import os
    import subprocess
    import sys

    from dictlab.cli import main

    config = tmp_path / "c.yaml"
    write_run_config(config, "ck", tiny_models["llama"], pile_dir, train_tokens=1500,
                     fit=[{"method": "sae", "rule": "batchtopk", "latents": [2048], "k": 4, "steps": 1200,
                           "batch_size": 256, "lr": 1e-3, "checkpoint_every": 50}])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "extract", str(config)]) == 0

    def fit(out):
        return [sys.executable, "-m", "dictlab.cli", "--quiet", "--runs-dir", str(runs), "fit", str(config),
                "--out", str(out)]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    checkpoint = killed / "L1.resid_post" / ".sae-batchtopk-n2048-k4.checkpoint.pt"
    proc = subprocess.Popen(fit(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(proc, checkpoint, "training", settle=0.5)
    assert checkpoint.exists() and not (checkpoint.parent / "sae-batchtopk-n2048-k4" / "config.json").exists()
    subprocess.run(fit(killed), env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(fit(whole), env=env, check=True, capture_output=True)
    name = "L1.resid_post/sae-batchtopk-n2048-k4"
    assert (killed / name / "weights.safetensors").read_bytes() == (whole / name / "weights.safetensors").read_bytes()
    a, b = (json.loads((d / name / "config.json").read_text())["training"] for d in (killed, whole))
    assert a == b and a[-1]["step"] == 1199
    assert not checkpoint.exists()  # removed once training ended


def test_a_foreign_or_corrupted_checkpoint_is_refused(tmp_path):
    x = torch.randn(600, 8)
    cfg = TrainConfig(steps=20, lr=1e-3, warmup_steps=2)
    ck = tmp_path / "ck.pt"
    sae = SparseAutoencoder(8, 16, rule="topk", k=2)
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(DictlabError, match="ck.pt is corrupted"):
        train(sae, tensor_batches(x, 64), cfg, progress=False, checkpoint=ck, checkpoint_every=5)
    ck.unlink()
    # a checkpoint left by a run of another width
    other = SparseAutoencoder(8, 32, rule="topk", k=2)
    with pytest.raises(KeyboardInterrupt):
        def interrupted(start):
            yield from islice(tensor_batches(x, 64)(start), 12)
            raise KeyboardInterrupt
        train(other, interrupted, cfg, progress=False, checkpoint=ck, checkpoint_every=5)
    assert ck.exists()
    with pytest.raises(DictlabError, match="belongs to another SAE, sweep or training config"):
        train(sae, tensor_batches(x, 64), cfg, progress=False, checkpoint=ck, checkpoint_every=5)


def test_weights_and_biases_offline_run_gets_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    x = torch.randn(600, 8)
    sae = SparseAutoencoder(8, 16, rule="topk", k=2)
    train(sae, tensor_batches(x, 64), TrainConfig(steps=12, warmup_steps=2), progress=False, log_every=5,
          wandb_project="dictlab-test", wandb_dir=tmp_path, run_name="tiny")
    import time

    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    needles = (b"train/mse", b"train/l0", b"dictlab-test", b"topk")
    deadline = time.time() + 60  # wandb's service process may still be flushing its log when finish returns
    while not all(n in runs[0].read_bytes() for n in needles) and time.time() < deadline:
        time.sleep(0.2)
    data = runs[0].read_bytes()
    for needle in needles:
        assert needle in data


# --- sweeps -------------------------------------------------------------------------------------
def sweep_members():
    return [SparseAutoencoder(16, 32, rule="topk", k=2, seed=1), SparseAutoencoder(16, 32, rule="topk", k=4, seed=1),
            SparseAutoencoder(16, 64, rule="relu", l1_coeff=0.1, seed=2)]


def test_a_sweep_shares_each_batch_and_ends_as_each_sae_trained_alone():
    codes, atoms = planted(n=3000, d=16, atoms=24)
    x = codes @ atoms
    cfg = TrainConfig(steps=40, lr=1e-3, warmup_steps=5)
    reads = []

    def counted(start):
        for batch in tensor_batches(x, 128)(start):
            reads.append(1)
            yield batch

    swept = sweep_members()
    histories = train_sweep(swept, counted, cfg, progress=False, log_every=10)
    assert len(reads) == 40  # one read per step serves all three
    for sae, history in zip(swept, histories):
        alone = sweep_members()[swept.index(sae)]
        assert train(alone, tensor_batches(x, 128), cfg, progress=False, log_every=10) == history
        for name, tensor in sae.state_dict().items():
            assert torch.equal(tensor, alone.state_dict()[name]), name
    assert [h[-1]["l0"] for h in histories[:2]] == [2, 4]


def test_an_interrupted_sweep_resumes_to_the_same_weights(tmp_path):
    x = torch.randn(2000, 16)
    cfg = TrainConfig(steps=30, lr=1e-3, warmup_steps=3)
    ck = tmp_path / "sweep.pt"

    def interrupted(start):
        yield from islice(tensor_batches(x, 64)(start), 17)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sweep(sweep_members(), interrupted, cfg, progress=False, checkpoint=ck, checkpoint_every=5)
    assert ck.exists()
    with pytest.raises(DictlabError, match="belongs to another SAE, sweep"):  # a sweep of other members
        train_sweep(sweep_members()[:2], tensor_batches(x, 64), cfg, progress=False, checkpoint=ck,
                    checkpoint_every=5)
    resumed, whole = sweep_members(), sweep_members()
    a = train_sweep(resumed, tensor_batches(x, 64), cfg, progress=False, checkpoint=ck, checkpoint_every=5)
    b = train_sweep(whole, tensor_batches(x, 64), cfg, progress=False)
    assert a == b and not ck.exists()
    for r, w in zip(resumed, whole):
        assert all(torch.equal(t, w.state_dict()[n]) for n, t in r.state_dict().items())


def test_bf16_autocast_is_taken_where_bf16_products_are_faster(monkeypatch):
    from dictlab.dictionaries import sae_fit
    from dictlab.dictionaries.learner import parse_entry

    entry = parse_entry({"method": "sae"})
    for faster in (True, False):
        monkeypatch.setattr(sae_fit, "bfloat16_is_faster", lambda device, faster=faster: faster)
        assert entry.autocast(torch.device("cpu")) == ("bfloat16" if faster else None)
    assert parse_entry({"method": "sae", "gpu_bf16": False}).autocast(torch.device("cpu")) is None  # the old name
