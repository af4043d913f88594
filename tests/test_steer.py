import pytest
import torch

from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError
from dictlab.lm import Edit, load_model, parse_site
from dictlab.steer import bootstrap, measure, steering_edit

SITE = "L1.resid_post"


class LinearReLU(Dictionary):
    """codes = relu(x E + b), x̂ = codes D: a hand-built SAE."""

    kind = "steer_linear_relu_for_tests"

    def __init__(self, encoder, bias, decoder):
        self.encoder, self.bias, self.decoder = encoder, bias, decoder

    @property
    def directions(self):
        return self.decoder

    def encode_sparse(self, x):
        codes = torch.relu(x @ self.encoder + self.bias)
        return codes, torch.arange(codes.shape[1]).expand(x.shape[0], -1)

    def tensors(self):
        return {"encoder": self.encoder, "bias": self.bias, "decoder": self.decoder}

    def config(self):
        return {}

    @classmethod
    def from_saved(cls, tensors, config):
        return cls(tensors["encoder"], tensors["bias"], tensors["decoder"])


@pytest.fixture(scope="module")
def model_and_data(tiny_models):
    model, _ = load_model(str(tiny_models["llama"]))
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (6, 12), generator=g)
    batches = [(ids[:3], torch.ones(3, 12, dtype=torch.long)), (ids[3:], torch.ones(3, 12, dtype=torch.long))]
    # unit 0: a constant code of 2 everywhere; units 1 and 2: tied, unit 2's direction leans on unit 1's
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    d1, d2 = basis[0], torch.nn.functional.normalize(basis[0] + basis[1], dim=0)
    decoder = torch.stack([basis[2], d1, d2, basis[3]])
    encoder = decoder.T.clone()
    encoder[:, 0] = 0
    bias = torch.tensor([2.0, 50.0, 50.0, 0.0])  # large biases: units 1 and 2 stay in ReLU's linear part
    return model, batches, LinearReLU(encoder, bias, decoder)


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_alpha_zero_and_clamping_to_the_unsteered_value_change_nothing(model_and_data):
    model, batches, sae = model_and_data
    for edit in (steering_edit(sae, SITE, 1, alpha=0.0), steering_edit(sae, SITE, 0, clamp=2.0),
                 steering_edit(sae, SITE, 1, alpha=0.0, hold=[2])):
        out = measure(model, sae, SITE, batches, edit, unit=1, lens_ids=[5, 6])
        for key in ("target", "drift", "kl", "lens", "loss"):
            assert out[key].abs().max() < 1e-6, key
    assert no_hooks(model)


def test_adding_a_direction_moves_its_unit_and_holding_a_neighbour_keeps_it(model_and_data):
    model, batches, sae = model_and_data
    plain = measure(model, sae, SITE, batches, steering_edit(sae, SITE, 1, alpha=3.0), unit=1)
    assert torch.allclose(plain["target"], torch.full((6,), 3.0), atol=1e-4)  # tied, unit-norm: a_1 rises by α
    assert (plain["kl"] > 0).all()
    held = measure(model, sae, SITE, batches, steering_edit(sae, SITE, 1, alpha=3.0, hold=[2]), unit=2)
    assert held["target"].abs().max() < 1e-4  # unit 2 back at its unsteered code
    drifted = measure(model, sae, SITE, batches, steering_edit(sae, SITE, 1, alpha=3.0), unit=2)
    assert (drifted["target"] > 1).all()  # without holding, unit 2 follows unit 1
    # clamping sets the code itself: two clamp values differ by their difference on every context
    low, high = (measure(model, sae, SITE, batches, steering_edit(sae, SITE, 1, clamp=v), unit=1)["target"]
                 for v in (40.0, 45.0))
    assert torch.allclose(high - low, torch.full((6,), 5.0), atol=1e-3)


def test_bad_input_is_refused_and_hooks_are_always_removed(model_and_data):
    model, batches, sae = model_and_data
    with pytest.raises(DictlabError, match="unit 7 is out of range: the dictionary has 4 units"):
        steering_edit(sae, SITE, 7, alpha=1.0)
    with pytest.raises(DictlabError, match="exactly one of alpha"):
        steering_edit(sae, SITE, 1)
    with pytest.raises(DictlabError, match="must be finite"):
        steering_edit(sae, SITE, 1, alpha=float("inf"))
    with pytest.raises(DictlabError, match="non-finite"):
        measure(model, sae, SITE, batches, steering_edit(sae, SITE, 1, alpha=1e39), unit=1)
    assert no_hooks(model)

    def fails(read, current):
        raise RuntimeError("boom")

    where = parse_site(SITE)
    with pytest.raises(RuntimeError, match="boom"):
        measure(model, sae, SITE, batches, Edit(where, where, fails), unit=1)
    assert no_hooks(model)


def test_bootstrap_interval_brackets_the_mean():
    values = torch.arange(100, dtype=torch.float)
    mean, low, high = bootstrap(values)
    assert mean == pytest.approx(49.5) and low < mean < high and high - low < 15
    assert bootstrap(torch.full((5,), 2.0)) == (2.0, 2.0, 2.0)


def test_compare_ablation_and_generation(model_and_data, tiny_models):
    from dictlab.steer import ablation, compare, generate

    model, batches, sae = model_and_data
    rows = compare(model, sae, SITE, batches, units=[1], alphas=[0.0, 3.0], held={1: [2]})
    assert [(r["alpha"], r["mode"]) for r in rows] == [(0.0, "plain"), (0.0, "corrective"), (3.0, "plain"),
                                                        (3.0, "corrective")]
    plain, corrective = rows[2], rows[3]
    # holding unit 2 (cos 1/√2 with unit 1) takes back 3/√2 along d_2: unit 1 keeps 3 − 3/2
    assert plain["target"][0] == pytest.approx(3.0, abs=1e-4) and corrective["target"][0] == pytest.approx(1.5, abs=1e-3)
    assert corrective["drift"][0] < plain["drift"][0]  # unit 2 held: less drift off the target
    for row in rows:
        mean, low, high = row["kl"]
        assert low <= mean <= high
    ranked = ablation(model, sae, SITE, batches, units=[0, 1, 3])
    assert [r["loss"][0] for r in ranked] == sorted((r["loss"][0] for r in ranked), reverse=True)
    _, tokenizer = load_model(str(tiny_models["llama"]))
    text, perplexity = generate(model, tokenizer, "the cat", None, new_tokens=5)
    same, again = generate(model, tokenizer, "the cat", steering_edit(sae, SITE, 1, alpha=0.0), new_tokens=5)
    assert text == same and perplexity == pytest.approx(again) and perplexity > 0
    steered, _ = generate(model, tokenizer, "the cat", steering_edit(sae, SITE, 3, alpha=200.0), new_tokens=5)
    assert isinstance(steered, str)


def test_dictlab_steer_compares_plain_and_corrective_steering_and_ranks_ablations(tmp_path, pile_dir, tiny_models,
                                                                                   capsys):
    import json

    from tiny import write_run_config

    from dictlab.cli import main

    config = tmp_path / "c.yaml"
    write_run_config(config, "s", tiny_models["llama"], pile_dir, train_tokens=1200,
                     fit=[{"method": "sae", "latents": [32], "k": 4, "steps": 40, "batch_size": 64, "lr": 3e-3,
                           "warmup_steps": 4}])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0
    store, folder = runs / "s" / "store", runs / "s" / "dictionaries" / "L1.resid_post" / "sae-topk-n32-k4"
    assert main(["--quiet", "graph", "--store", str(store), str(folder), "--min-r", "0.05", "--min-count", "1"]) == 0
    capsys.readouterr()
    assert main(["--quiet", "steer", str(folder), "--store", str(store), "--units", "0,1", "--alphas", "0,0.5",
                 "--graph", str(folder / "graph"), "--contexts", "3", "--new-tokens", "3"]) == 0
    out = json.loads((folder / "steering.json").read_text())
    assert out["alphas"][0] == 0 and out["alphas"][1] == pytest.approx(0.5 * out["median_norm"])
    modes = {(r["unit"], r["alpha"], r["mode"]) for r in out["steering"]}
    assert {(u, a, "plain") for u in (0, 1) for a in out["alphas"]} <= modes
    assert any(m == "corrective" for _, _, m in modes) and out["held"]
    for r in out["steering"]:
        if r["alpha"] == 0:
            assert abs(r["kl"][0]) < 1e-6 and abs(r["target"][0]) < 1e-5
    assert sorted(r["unit"] for r in out["ablation"]) == [0, 1]
    assert out["generations"]["unsteered"]["perplexity"] > 0 and len(out["generations"]["steered"]) >= 4
    assert main(["--quiet", "steer", str(folder), "--store", str(store), "--units", "99"]) == 2
    assert "unit 99 is out of range: the dictionary has 32 units" in capsys.readouterr().err
