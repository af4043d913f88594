import pytest
import torch

from dictlab.analyses.steer import measure, steering_edit
from dictlab.data.lm import ActivationCapture, Edit, load_model, parse_site
from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError

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


def test_kl_loss_and_lens_equal_the_closed_forms_on_the_full_logits(model_and_data):
    from dictlab.data.lm import SiteEditor

    model, batches, sae = model_and_data
    # padding in the second context: only real predicting positions count
    batches = [batches[0], (batches[1][0], torch.tensor([[1] * 12, [1] * 12, [1] * 7 + [0] * 5]))]
    edit, lens = steering_edit(sae, SITE, 1, alpha=3.0), [5, 6]
    out = measure(model, sae, SITE, batches, edit, unit=1, lens_ids=lens)
    expected = {"kl": [], "loss": [], "lens": []}
    for ids, mask in batches:
        valid = mask[:, 1:].bool()
        log_p = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        with SiteEditor(model, [edit]):
            log_q = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        nll = lambda lp: -lp.gather(-1, ids[:, 1:, None])[..., 0]  # noqa: E731
        per_token = {"kl": (log_p.exp() * (log_p - log_q)).sum(-1), "loss": nll(log_q) - nll(log_p),
                     "lens": log_q[..., lens].exp().sum(-1) - log_p[..., lens].exp().sum(-1)}
        for key, v in per_token.items():
            expected[key].append((v * valid).sum(1) / valid.sum(1))
    for key, v in expected.items():
        torch.testing.assert_close(out[key], torch.cat(v), rtol=1e-4, atol=1e-6)


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


def test_study_compares_plain_and_corrective_steering_ranks_ablations_and_generates(model_and_data, tiny_models):
    from dictlab.analyses.steer import generate, random_edit, study

    model, batches, sae = model_and_data
    out = study(model, sae, SITE, batches, units=[1], alphas=[0.0, 3.0], held={1: [2]})
    rows = out["steering"]
    modes = ("plain", "corrective", "random")
    assert [(r["alpha"], r["mode"]) for r in rows] == [(a, m) for a in (0.0, 3.0) for m in modes]
    plain, corrective, control = rows[3:]
    # the control moves the tied unit 1 by its random vector's projection on d_1, and α = 0 changes nothing
    zeros = torch.zeros(1, 2, sae.directions.shape[1])
    vector = random_edit(sae, SITE, 1, 3.0).fn(zeros, zeros)[0, 1]
    assert control["target"][0] == pytest.approx(float(vector @ sae.directions[1]), abs=1e-4)
    assert rows[2]["kl"][0] < 1e-6
    # holding unit 2 (cos 1/√2 with unit 1) takes back 3/√2 along d_2: unit 1 keeps 3 − 3/2
    assert plain["target"][0] == pytest.approx(3.0, abs=1e-4)
    assert corrective["target"][0] == pytest.approx(1.5, abs=1e-3)
    assert corrective["drift"][0] < plain["drift"][0]  # unit 2 held: less drift off the target
    assert plain["neighbour_drift"][0] > 1 and corrective["neighbour_drift"][0] < 1e-4  # unit 2 is the neighbour
    for row in rows:
        mean, low, high = row["kl"]
        assert low <= mean <= high
    ranked = study(model, sae, SITE, batches, units=[0, 1, 3], alphas=[1.0], held={})["ablation"]
    assert [r["loss"][0] for r in ranked] == sorted((r["loss"][0] for r in ranked), reverse=True)
    zeroed = {r["unit"]: r for r in ranked}
    capture = ActivationCapture(model, [parse_site(SITE)])
    width = model.config.hidden_size
    codes = torch.cat([sae.encode(capture.run(ids, mask, stop_early=False)[SITE][:, 1:].reshape(-1, width))[:, 1]
                       .reshape(len(ids), -1).mean(1) for ids, mask in batches])
    assert zeroed[1]["target"][0] == pytest.approx(-float(codes.mean()), abs=1e-3)  # set to 0 from its code
    assert zeroed[0]["target"][0] == 0  # unit 0's code is a constant 2: no edit of x can change it
    # the shared clean pass: measuring edits together equals measuring each alone
    alone = measure(model, sae, SITE, batches, steering_edit(sae, SITE, 1, alpha=3.0, hold=[2]), unit=1)
    assert corrective["target"][0] == pytest.approx(float(alone["target"].mean()), abs=1e-6)
    _, tokenizer = load_model(str(tiny_models["llama"]))
    text, perplexity = generate(model, tokenizer, "the cat", None, new_tokens=5)
    same, again = generate(model, tokenizer, "the cat", steering_edit(sae, SITE, 1, alpha=0.0), new_tokens=5)
    assert text == same and perplexity == pytest.approx(again) and perplexity > 0
    steered, _ = generate(model, tokenizer, "the cat", steering_edit(sae, SITE, 3, alpha=200.0), new_tokens=5)
    assert isinstance(steered, str)


def test_the_random_control_adds_a_direction_of_the_same_norm_everywhere_but_bos(model_and_data):
    from dictlab.analyses.steer import random_edit

    _, _, sae = model_and_data
    current = torch.randn(2, 5, sae.directions.shape[1])
    for unit, alpha in ((1, 3.0), (3, -2.0)):
        out = random_edit(sae, SITE, unit, alpha).fn(current, current)
        shift = out - current
        assert torch.equal(out[:, 0], current[:, 0])  # BOS untouched
        assert torch.allclose(shift[:, 1:], shift[0, 1].expand_as(shift[:, 1:]), atol=1e-5)  # one vector everywhere
        assert shift[0, 1].norm() == pytest.approx(abs(alpha) * float(sae.directions[unit].norm()), rel=1e-5)
    a, b = (random_edit(sae, SITE, u, 1.0).fn(current, current) for u in (1, 3))
    assert not torch.allclose(a, b)  # seeded per unit


def test_diffmean_equals_the_direct_difference_of_means_far_from_the_origin_and_is_steered_with_the_same_norm(
        model_and_data):
    from dictlab.analyses.steer import study
    from dictlab.analyses.steering_controls import diffmean_directions, diffmean_edit
    model, batches, sae = model_and_data
    g = torch.Generator().manual_seed(1)
    width = sae.directions.shape[1]
    x = 5000 / width ** 0.5 + torch.randn(600, width, generator=g)  # norm ~5000
    x[:, 0] = torch.linspace(-3, 3, 600)  # a coordinate that decides whether unit 3 fires
    sae3 = type(sae)(sae.encoder.clone(), sae.bias.clone(), sae.decoder.clone())
    sae3.encoder[:, 3] = 0
    sae3.encoder[0, 3] = 1.0  # unit 3 fires exactly where x_0 > 0
    sae3.bias[3] = 0
    got = diffmean_directions(sae3, x.split(128), [3])[3]
    on = x[:, 0] > 0
    direct = x[on].double().mean(0) - x[~on].double().mean(0)
    assert torch.allclose(got.double(), direct, atol=1e-3) and got[0] == pytest.approx(3.0, abs=0.02)
    assert diffmean_directions(sae3, x.split(128), [0]) == {0: None}  # unit 0 (a constant code) is never off
    current = torch.randn(2, 5, width)
    shift = diffmean_edit(sae3, SITE, 3, 2.0, got).fn(current, current) - current
    assert torch.equal(shift[:, 0], torch.zeros_like(shift[:, 0]))  # BOS untouched
    assert shift[0, 1].norm() == pytest.approx(2.0 * float(sae3.directions[3].norm()), rel=1e-5)
    assert torch.nn.functional.cosine_similarity(shift[0, 1], got, dim=0) == pytest.approx(1.0, abs=1e-5)
    rows = study(model, sae3, SITE, batches, units=[3], alphas=[1.0], held={}, diffmean={3: got})["steering"]
    assert [r["mode"] for r in rows] == ["plain", "random", "diffmean"] and rows[2]["kl"][0] > 0


def test_downstream_drift_and_linked_units(model_and_data):
    model, batches, sae = model_and_data
    edit = steering_edit(sae, SITE, 1, alpha=3.0)
    # the same dictionary read again at the same site: the linked unit 1 (r > 0) moves exactly as the target,
    # and a negative r flips its sign
    same = measure(model, sae, SITE, batches, edit, unit=1, downstream=(sae, SITE), linked=[(1, 0.9)])
    assert torch.allclose(same["downstream_linked"], same["target"], atol=1e-5)
    flipped = measure(model, sae, SITE, batches, edit, unit=1, downstream=(sae, SITE), linked=[(1, -0.9)])
    assert torch.allclose(flipped["downstream_linked"], -same["target"], atol=1e-5)
    # a later layer: nothing moves at α = 0, something does at α = 3
    later = "L2.resid_post" if model.config.num_hidden_layers > 2 else "L1.mlp_out"
    zero = measure(model, sae, SITE, batches, steering_edit(sae, SITE, 1, alpha=0.0), unit=1,
                   downstream=(sae, later), linked=[(2, 0.5)])
    moved = measure(model, sae, SITE, batches, edit, unit=1, downstream=(sae, later), linked=[(2, 0.5)])
    assert zero["downstream_drift"].abs().max() < 1e-6 and zero["downstream_linked"].abs().max() < 1e-6
    assert (moved["downstream_drift"] > 1e-3).all()
    assert no_hooks(model)


def test_neighbours_read_within_and_cross_site_graphs(tmp_path):
    import json

    from safetensors.torch import save_file

    from dictlab.analyses.steer import neighbours

    edges = {"i": torch.tensor([0, 1, 2, 3], dtype=torch.int32), "j": torch.tensor([1, 2, 3, 1], dtype=torch.int32),
             "r": torch.tensor([0.4, -0.9, 0.5, 0.6])}
    for name, sides in (("within", [{"site": "L1"}, {"site": "L1"}]), ("cross", [{"site": "L1"}, {"site": "L2"}])):
        (tmp_path / name).mkdir()
        save_file(edges, str(tmp_path / name / "adjacency.safetensors"), metadata={"sides": json.dumps(sides)})
    within = neighbours(tmp_path / "within", 1, most=2)
    assert [u for u, _ in within] == [2, 3] and within[0][1] == pytest.approx(-0.9)
    assert [u for u, _ in neighbours(tmp_path / "cross", 1)] == [2]  # only edges leaving unit 1 on side A
    assert neighbours(tmp_path / "cross", 3) == [(1, pytest.approx(0.6))]
    with pytest.raises(DictlabError, match="no adjacency.safetensors"):
        neighbours(tmp_path, 1)


def test_dictlab_steer_compares_plain_and_corrective_steering_and_ranks_ablations(tmp_path, pile_dir, tiny_models,
                                                                                   capsys, write_run_config):
    import json

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
                 "--graph", str(folder / "graph"), "--contexts", "3", "--new-tokens", "3", "--ablate-set",
                 "0,1,2"]) == 0
    out = json.loads((folder / "steering.json").read_text())
    assert out["alphas"] == [0, 0.5]
    from dictlab.data.store import Store
    from dictlab.dictionaries import load_dictionary

    sae = load_dictionary(folder)
    peak = torch.cat([sae.encode(x.float()) for x in Store(store).batches("L1.resid_post", "eval", 64)]).max(0).values
    for r in out["steering"]:  # α is a multiple of the unit's largest code on the eval split
        assert r["added"] == pytest.approx(r["alpha"] * float(peak[r["unit"]]), rel=1e-5)
    modes = {(r["unit"], r["alpha"], r["mode"]) for r in out["steering"]}
    assert {(u, a, "plain") for u in (0, 1) for a in out["alphas"]} <= modes
    assert any(m == "corrective" for _, _, m in modes) and out["held"]
    for r in out["steering"]:
        if r["alpha"] == 0:
            assert abs(r["kl"][0]) < 1e-6 and abs(r["target"][0]) < 1e-5
    singles = [r["unit"] for r in out["ablation"] if isinstance(r["unit"], int)]
    top = [a["unit"] for a in out["attribution"]][:5]  # every unit ranked by its estimate; the top 5 verified
    assert set(singles) == {0, 1} | set(top) and len(out["attribution"]) == 20
    assert [a["estimate"] for a in out["attribution"]] == sorted((a["estimate"] for a in out["attribution"]),
                                                                 reverse=True)
    sets = sorted(tuple(r["unit"]) for r in out["ablation"] if not isinstance(r["unit"], int))
    assert sets == [(0, 1), (0, 1, 2)]  # the steered units together, and --ablate-set
    assert out["generations"]["unsteered"]["perplexity"] > 0 and len(out["generations"]["steered"]) >= 4
    assert main(["--quiet", "steer", str(folder), "--store", str(store), "--units", "99"]) == 2
    assert "unit 99 is out of range: the dictionary has 32 units" in capsys.readouterr().err


def test_attribution_is_the_first_order_change_of_loss_and_sets_ablate_together(model_and_data):
    from dictlab.analyses.steer import ablation_edit, attribution
    from dictlab.measures.downstream import keep_bos

    model, batches, sae = model_and_data
    estimates = attribution(model, sae, SITE, batches)
    assert no_hooks(model) and estimates.shape == (4,)
    # a finite difference of the same ablation: move every code a small step eps of the way to 0
    eps = 1e-3
    for unit in (1, 3):
        def partial(read, current, unit=unit):
            return current - eps * sae.encode(current.reshape(-1, current.shape[-1]))[:, unit].reshape(
                *current.shape[:-1], 1) * sae.directions[unit]

        where = parse_site(SITE)
        moved = measure(model, sae, SITE, batches, Edit(where, where, keep_bos(partial)), unit=unit)["loss"].mean()
        assert float(moved) / eps == pytest.approx(float(estimates[unit]), rel=0.05, abs=1e-3)
    # a set is ablated in one step, through the decoder: x − a_1 d_1 − a_2 d_2 (BOS untouched)
    x = torch.randn(2, 5, sae.directions.shape[1])
    out = ablation_edit(sae, SITE, [1, 2]).fn(x, x)
    codes = sae.encode(x[:, 1:].reshape(-1, x.shape[-1]))
    expected = x[:, 1:].reshape(-1, x.shape[-1]) - codes[:, 1:2] * sae.directions[1] - codes[:, 2:3] * sae.directions[2]
    assert torch.equal(out[:, 0], x[:, 0]) and torch.allclose(out[:, 1:].reshape(-1, x.shape[-1]), expected, atol=1e-4)
    halves = ablation_edit(sae, SITE, [1, 2], to=[1.0, 2.0]).fn(x, x)[:, 1:].reshape(-1, x.shape[-1])
    assert torch.allclose(halves, expected + sae.directions[1] + 2 * sae.directions[2], atol=1e-4)


def test_edits_run_where_the_dictionary_is():
    """Steering, ablation and the random control build their tensors beside the dictionary's ("meta"
    refuses CPU tensors: a GPU run would fail the same way)."""
    from dictlab.analyses.steer import ablation_edit, random_edit
    from dictlab.dictionaries import SparseAutoencoder

    sae = SparseAutoencoder(8, 16, rule="topk", k=3).on_device("meta")
    x = torch.empty(2, 5, 8, device="meta")
    edits = [steering_edit(sae, "L1.resid_post", 0, alpha=2.0, hold=[1, 2]),
             steering_edit(sae, "L1.resid_post", 0, clamp=1.5),
             ablation_edit(sae, "L1.resid_post", [0, 3]), ablation_edit(sae, "L1.resid_post", [0], to=[0.5]),
             random_edit(sae, "L1.resid_post", 4, alpha=1.0)]
    for edit in edits:
        assert edit.fn(x, x).device.type == "meta"
