import math

import pytest
import torch

from dictlab.dictionaries import KMeans
from dictlab.dictionaries.base import Dictionary
from dictlab.interpret.units import HISTOGRAM_BINS, logit_lens, merge_top, unit_examples, windows


class Codes(Dictionary):
    """A dictionary whose codes are given: row i of x holds its own codes (d_model = n_latents)."""

    kind = "codes_for_tests"

    def __init__(self, n: int):
        self.n = n

    @property
    def directions(self):
        return torch.eye(self.n)

    def encode_sparse(self, x):
        return x, torch.arange(self.n).expand(x.shape[0], -1)

    def tensors(self):
        return {}

    def config(self):
        return {"n": self.n}

    @classmethod
    def from_saved(cls, tensors, config):
        return cls(config["n"])


def sparse_codes(n=3000, units=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, units, generator=g) * (torch.rand(n, units, generator=g) < 0.3)


def test_streaming_top_rows_equal_brute_force_whatever_the_batching():
    codes = sparse_codes()
    expected_v, expected_r = codes.T.topk(20, dim=1)
    for size in (1, 97, 3000):
        v, r = torch.full((7, 20), -math.inf), torch.full((7, 20), -1, dtype=torch.long)
        for i, batch in enumerate(codes.split(size)):
            active = batch != 0
            rows = torch.arange(batch.shape[0]).unsqueeze(1).expand_as(batch) + i * size
            units = torch.arange(7).expand_as(batch)
            v, r = merge_top(v, r, units[active], batch[active], rows[active])
        assert torch.equal(v, expected_v) and torch.equal(r, expected_r), size


def test_few_active_rows_leave_empty_slots():
    v, r = merge_top(torch.full((3, 4), -math.inf), torch.full((3, 4), -1, dtype=torch.long),
                     torch.tensor([1, 1]), torch.tensor([0.5, 2.0]), torch.tensor([7, 3]))
    assert r[1].tolist() == [3, 7, -1, -1] and r[0].tolist() == [-1] * 4 and v[1, 0] == 2.0


def test_latent_examples_frequency_histogram_and_interval_samples():
    codes = sparse_codes()
    out = unit_examples(Codes(7), lambda: iter(codes.split(500)), n_top=10, intervals=5, per_interval=4)
    assert torch.allclose(out["frequency"], (codes != 0).double().mean(0))
    assert torch.allclose(out["max"], codes.max(0).values)
    assert torch.equal(out["top_rows"], codes.T.topk(10, dim=1).indices)
    assert torch.equal(out["histogram"].sum(1), (codes != 0).sum(0))
    for unit in range(7):
        frac = codes[:, unit] / codes[:, unit].max()
        for interval in range(5):
            rows = out["samples"][unit, interval]
            assert (rows >= 0).all()  # 3000 rows: every interval has at least 4 members
            inside = (frac[rows] > interval / 5 - 1e-6) & (frac[rows] <= (interval + 1) / 5 + 1e-6)
            assert inside.all(), (unit, interval)
        # the histogram's first bin counts activations in (0, 0.1·max]
        assert out["histogram"][unit, 0] == int(((frac > 0) & (frac <= 1 / HISTOGRAM_BINS)).sum())
    again = unit_examples(Codes(7), lambda: iter(codes.split(123)), n_top=10, intervals=5, per_interval=4)
    # random keys are drawn in row order, so the samples do not depend on the batching either
    assert torch.equal(again["samples"], out["samples"]) and torch.equal(again["top_rows"], out["top_rows"])


def test_cluster_examples_are_the_members_closest_to_the_centre_and_random_members():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 4, generator=g) + 10 * i for i in range(3)])
    km = KMeans(3, seed=0).fit(x, progress=False)
    out = unit_examples(km, lambda: iter(x.split(128)), n_top=5, n_random=6)
    assert out["kind"] == "cluster" and out["samples"].shape == (3, 1, 6)
    label = km.assign(x)
    dist = (x - km.centers[label]).square().sum(1)
    for unit in range(3):
        members = (label == unit).nonzero().squeeze(1)
        closest = members[dist[members].argsort()[:5]]
        assert torch.equal(out["top_rows"][unit], closest)
        assert (label[out["samples"][unit, 0]] == unit).all()
        assert out["frequency"][unit] == pytest.approx(len(members) / len(x))


@pytest.mark.parametrize("bf16_faster", [True, False])  # the shortlist in bfloat16 or float32, by the machine
def test_logit_lens_is_the_unembedding_of_the_normed_direction(tiny_models, monkeypatch, bf16_faster):
    from dictlab.data.lm import ARCHITECTURES, load_model
    from dictlab.interpret import units

    monkeypatch.setattr(units, "bfloat16_is_faster", lambda device: bf16_faster)
    for arch in ("gpt2", "gemma2"):
        model, _ = load_model(str(tiny_models[arch]))
        d = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        path = ARCHITECTURES[model.config.model_type].final_norm
        logits = model.get_submodule(path)(d) @ model.get_output_embeddings().weight.T
        for shortlist in (64, 5):  # the whole vocabulary, then a shortlist re-scored in float32
            lens = logit_lens(model, d, path, k=3, shortlist=shortlist)
            assert torch.equal(lens["top_ids"], logits.topk(3, dim=1).indices)
            assert torch.equal(lens["bottom_ids"], logits.topk(3, dim=1, largest=False).indices)
            torch.testing.assert_close(lens["top_logits"], logits.topk(3, dim=1).values)


def test_windows_hold_the_context_tokens_and_the_unit_scores(tmp_path, pile_dir, tiny_models):
    from dictlab.data.corpus import CorpusConfig
    from dictlab.data.extract import ExtractConfig, extract
    from dictlab.data.store import Store

    corpus = CorpusConfig(source=f"hub:{pile_dir}", eval_fraction=0.2)
    cfg = ExtractConfig(layers=[1], context_length=16, train_tokens=400, eval_tokens=100, model_dtype="float32")
    store = Store(extract(str(tiny_models["llama"]), corpus, cfg, tmp_path / "store", progress=False))
    x = store.load("L1.resid_post", "train")
    km = KMeans(4, seed=0).fit(x, progress=False)
    tokens = torch.cat([b["token"] for b in store.batches("L1.resid_post", "train", 512, columns=("token",))])
    context = torch.cat([b["context"] for b in store.batches("L1.resid_post", "train", 512, columns=("context",))])
    rows = torch.tensor([0, 5, 40])
    units = km.assign(x[rows])
    out = windows(store, "L1.resid_post", "train", rows, 3, 2, km, units, with_active=1)
    assert out[-1]["active"] == [int(units[-1])] and "active" not in out[0]  # a row's cluster is its one active unit
    for example, row, unit in zip(out, rows.tolist(), units.tolist()):
        target = example["target"]
        assert example["tokens"][target] == int(tokens[row])
        start = row - target
        assert example["tokens"] == tokens[start:start + len(example["tokens"])].tolist()
        assert (context[start:start + len(example["tokens"])] == context[row]).all()
        score = float(-(x[row] - km.centers[unit]).square().sum())
        assert example["scores"][target] == pytest.approx(score, rel=1e-5)
    assert out[0]["target"] == 0  # the first row of the store has nothing before it

    class Thresholded(Codes):  # latents: codes relu(x - 0.5), inactive where 0
        def encode_sparse(self, x):
            return torch.relu(x - 0.5), torch.arange(self.n).expand(x.shape[0], -1)

    codes = torch.relu(x.float() - 0.5)
    rows = torch.tensor([3, 17, 17, 60, 200])
    units = torch.tensor([0, 5, 2, 31, 7])
    for example, row, unit in zip(windows(store, "L1.resid_post", "train", rows, 4, 4, Thresholded(x.shape[1]), units),
                                  rows.tolist(), units.tolist()):
        start = row - example["target"]
        expected = codes[start:start + len(example["tokens"]), unit]
        assert example["scores"] == pytest.approx(expected.tolist(), abs=1e-6)


def test_dictlab_interpret_writes_every_unit_with_examples_and_logit_lens(tmp_path, pile_dir, tiny_models, capsys,
                                                                          write_run_config, headless_chromium):
    import json

    from dictlab.cli import main
    from dictlab.data.lm import load_model

    config = tmp_path / "c.yaml"
    write_run_config(config, "i", tiny_models["llama"], pile_dir, train_tokens=1200,
                     fit=[{"method": "kmeans", "k": [3]},
                          {"method": "sae", "latents": [16], "k": 2, "steps": 30, "batch_size": 64, "lr": 3e-3,
                           "warmup_steps": 3}])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "extract", str(config)]) == 0
    assert main(["--quiet", "--runs-dir", str(runs), "fit", str(config)]) == 0
    folders = sorted((runs / "i" / "dictionaries" / "L1.resid_post").iterdir())
    capsys.readouterr()
    assert main(["--quiet", "interpret", "--store", str(runs / "i" / "store"), "--n-top", "4",
                 *map(str, folders)]) == 0
    assert capsys.readouterr().out.count("interpretation.json") == 2
    _, tokenizer = load_model(str(tiny_models["llama"]))
    for folder, kind, units in zip(folders, ("cluster", "latent"), (3, 16)):
        data = json.loads((folder / "interpretation.json").read_text())
        assert data["kind"] == kind and len(data["units"]) == units and data["split"] == "eval"
        for unit in data["units"]:
            if unit["frequency"] == 0:
                assert unit["top"] == []
                continue
            assert 1 <= len(unit["top"]) <= 4 and len(unit["logit_lens"]["top"]) == 8
            scores = [e["scores"][e["target"]] for e in unit["top"]]
            assert scores == sorted(scores, reverse=True)  # best first
            example = unit["top"][0]
            assert example["tokens"][example["target"]] == tokenizer.decode([example["token_id"]])
            assert (unit["coherence"] is None) == (len(unit["top"]) < 2)
        assert data["summary"]["units_firing"] == sum(u["frequency"] > 0 for u in data["units"])

    # the cards page renders every unit's card in headless Chromium, with no console errors
    browser = headless_chromium()
    try:
        browser.get((folders[1] / "cards.html").resolve().as_uri())
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        data = json.loads((folders[1] / "interpretation.json").read_text())
        rows = browser.find_elements("css selector", "#index tr[data-unit]")
        assert len(rows) == 16
        for unit in data["units"]:
            if not unit["top"]:
                continue
            number = unit["unit"]
            browser.find_element("css selector", f'#index tr[data-unit="{number}"]').click()
            assert browser.find_element("css selector", "#card h2").text == f"unit {unit['unit']}"
            spans = browser.find_elements("css selector", "#card .example .tok")
            expected = sum(len(e["tokens"]) for e in unit["top"] + [e for slot in unit["samples"] for e in slot])
            assert len(spans) == expected
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        browser.quit()


def test_monosemanticity_summary_counts_firing_units_by_each_score():
    from dictlab.interpret.units import monosemanticity

    def unit(frequency, entropy, share, coherence, **more):
        return {"frequency": frequency, "token_entropy": entropy, "top_token_share": share, "coherence": coherence,
                **more}

    units = [unit(0.0, None, None, None),  # dead: left out
             unit(0.1, 0.0, 1.0, 0.5),  # single-token
             unit(0.1, 1.5, 0.3, 2.5),  # coherent
             unit(0.1, 2.0, 0.2, None),  # neither (too few examples for coherence)
             unit(0.2, 1.0, 0.4, 1.0, detection=0.9)]  # detected by its explanation
    out = monosemanticity(units)
    assert out["units"] == 5 and out["units_firing"] == 4
    assert out["median_token_entropy"] == pytest.approx(1.25) and out["single_token_fraction"] == pytest.approx(0.25)
    assert out["median_coherence"] == pytest.approx(1.0) and out["coherent_fraction"] == pytest.approx(1 / 3)
    assert out["mean_detection"] == pytest.approx(0.9) and out["detected_fraction"] == 1
    assert out["monosemantic_fraction"] == pytest.approx(3 / 4)
    assert "mean_detection" not in monosemanticity(units[:4])  # no explanations: no detection scores
