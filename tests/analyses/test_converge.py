"""Cross-model convergence: the measures on known answers, and `dictlab converge` end to end on tiny models."""

import json
import shutil

import numpy as np
import pytest
import scipy.spatial.distance
import torch
import yaml

from dictlab.cli import main


# --- behaviour ------------------------------------------------------------------------------------
def test_top_k_jsd_is_exact_at_full_support_and_one_bit_for_disjoint_lists():
    from dictlab.analyses.convergence.behaviour import jsd_top_k

    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(30), 6), rng.dirichlet(np.ones(30), 6)
    ids = np.tile(np.arange(30), (6, 1))
    order = rng.permutation(30)  # the lists need not share an order
    exact = scipy.spatial.distance.jensenshannon(p, q, axis=1, base=2) ** 2
    np.testing.assert_allclose(jsd_top_k(ids, p, ids[:, order], q[:, order]), exact, rtol=1e-10)
    np.testing.assert_allclose(jsd_top_k(ids[:, :5], p[:, :5], ids[:, 5:10], q[:, 5:10]), 1.0)
    np.testing.assert_allclose(jsd_top_k(ids, p, ids, p), 0.0, atol=1e-12)


def test_tokens_of_two_vocabularies_compare_by_text(tmp_path, make_tokenizer, make_char_tokenizer):
    from dictlab.analyses.convergence.behaviour import merged_keys, token_texts, top1_agree

    words, chars = make_tokenizer(tmp_path / "w"), make_char_tokenizer(tmp_path / "c")
    tw, tc = token_texts(words), token_texts(chars)
    assert tw[words.convert_tokens_to_ids("cat")] == "cat" and tc[chars.convert_tokens_to_ids(" ")] == "␣"
    # "cat" (words) and "c" (chars) agree: one begins the other; "dogs" and "c" do not
    cat, dogs = words.convert_tokens_to_ids("cat"), words.convert_tokens_to_ids("dogs")
    c = chars.convert_tokens_to_ids("c")
    assert top1_agree(np.array([cat, dogs]), np.array([c, c]), tw, tc).tolist() == [True, False]
    # equal texts are one outcome: their probabilities add up
    table = {}
    keys, probs = merged_keys(np.array([[cat, dogs, cat]]), np.array([[0.5, 0.3, 0.1]]), tw, table)
    assert probs[0].tolist() == pytest.approx([0.6, 0.3, 0.0]) and keys[0, 2] == -1
    other, _ = merged_keys(np.array([[dogs]]), np.array([[1.0]]), tw, table)
    assert other[0, 0] == keys[0, 1]  # the same text, the same key, whichever side met it first


# --- paired text ------------------------------------------------------------------------------------
def test_positions_are_word_aligned_where_the_next_character_is_whitespace(tmp_path, make_tokenizer,
                                                                           make_char_tokenizer):
    from dictlab.data.paired_text import ModelText, choose, pair_rows, tokenize, word_boundary

    text = "the cat sat on a mat"
    assert word_boundary(text, np.array([3, 4, 7, 20, 0])).tolist() == [True, False, True, False, False]
    assert choose(np.arange(10)[:, None].repeat(2, 1), 4)[:, 0].tolist() == [0, 3, 6, 9]
    words, chars = make_tokenizer(tmp_path / "w"), make_char_tokenizer(tmp_path / "c")
    a, b = (ModelText(*map(list, zip(tokenize(t, text, 2)))) for t in (words, chars))
    rows = pair_rows(a, b, [text], 6)
    # every word token ends where some character token ends: the 6 words are the aligned positions
    assert rows.a[0].tolist() == [1, 2, 3, 4, 5, 6] and rows.ends[0].tolist() == [3, 7, 11, 14, 16, 20]
    assert [text[e - 1] for e in rows.ends[0]] == [w[-1] for w in text.split()]
    assert rows.b[0].tolist() == [3, 7, 11, 14, 16, 20]  # char i ends at i + 1, the start token at 0
    assert rows.word[0].tolist() == [True] * 5 + [False]


# --- statistics ---------------------------------------------------------------------------------------
def test_half_sample_intervals_cover_near_the_nominal_rate():
    from dictlab.measures.stats import half_sample_interval, half_samples

    rng = np.random.default_rng(3)
    covered_mean, covered_r = 0, 0
    for repeat in range(200):
        sample = rng.exponential(size=60)
        draws = [sample[h].mean() for h in half_samples(60, 60, seed=repeat)]
        _, low, high = half_sample_interval(sample.mean(), draws)
        covered_mean += low <= 1.0 <= high
        xy = rng.multivariate_normal([0, 0], [[1, 0.5], [0.5, 1]], size=80)
        r = lambda rows, xy=xy: np.corrcoef(xy[rows].T)[0, 1]  # noqa: E731
        _, low, high = half_sample_interval(r(np.arange(80)), [r(h) for h in half_samples(80, 60, seed=repeat)])
        covered_r += low <= 0.5 <= high
    assert 0.88 <= covered_mean / 200 <= 0.99 and 0.88 <= covered_r / 200 <= 0.99


def test_bootstrap_ratio_and_the_test_record():
    from dictlab.measures.stats import bootstrap_ratio, tested, unit_rows

    value, low, high = bootstrap_ratio([3.0, 1.0, 0.0], [4.0, 2.0, 2.0], n=200)
    assert value == pytest.approx(0.5) and low <= 0.5 <= high
    record = tested(0.9, np.array([0.1, 0.2, 0.3, 0.95]))
    assert record["p"] == pytest.approx(2 / 5) and record["z"] == pytest.approx((0.9 - 0.3875) / np.std(
        [0.1, 0.2, 0.3, 0.95], ddof=1))
    assert tested(0.1, np.array([0.2, 0.3]), "less")["p"] == pytest.approx(1 / 3)
    assert unit_rows(np.array([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]


# --- representation ---------------------------------------------------------------------------------------
def test_layer_sweep_equals_the_single_pair_functions_and_its_null_is_near_chance():
    from dictlab.analyses.convergence.representation import layer_sweep, rsa_rows
    from dictlab.measures import similarity

    rng = np.random.default_rng(0)
    docs, per_doc = 40, 8
    x = rng.normal(size=(docs * per_doc, 12)) @ rng.normal(size=(12, 12))
    related = np.tanh(x @ rng.normal(size=(12, 10))) + 0.5 * rng.normal(size=(docs * per_doc, 10))
    unrelated = rng.normal(size=(docs * per_doc, 10))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = layer_sweep([t(x)], [t(related), t(unrelated)], docs, per_doc, ("cka", "svcca", "knn", "rsa"), k=5,
                      rsa_positions=4, permutations=99, n_half=20)
    rows = rsa_rows(docs, per_doc, 4)
    for j, y in enumerate((related, unrelated)):
        assert out["cka"]["value"][0][j] == pytest.approx(similarity.linear_cka(x, y), abs=1e-6)
        assert out["svcca"]["value"][0][j] == pytest.approx(similarity.svcca(x, y), abs=1e-5)
        assert out["knn"]["value"][0][j] == pytest.approx(similarity.mutual_knn(x, y, 5))
        assert out["rsa"]["value"][0][j] == pytest.approx(similarity.rsa(x[rows], y[rows]), abs=1e-5)
    for m in out:
        related_test, unrelated_test = ({key: v[0][j] for key, v in out[m].items()} for j in (0, 1))
        assert related_test["p"] == pytest.approx(0.01)
        assert related_test["low"] < related_test["value"] < related_test["high"]
        assert unrelated_test["p"] > 0.02 and abs(unrelated_test["z"]) < 3.5


def test_a_model_against_itself_is_similar_everywhere_on_the_diagonal():
    from dictlab.analyses.convergence.representation import layer_sweep

    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(120, 16, generator=g) @ torch.randn(16, 16, generator=g) for _ in range(3)]
    out = layer_sweep(layers, layers, 20, 6, ("cka", "cosine", "knn", "svcca", "rsa"), k=4, rsa_positions=3,
                      permutations=20, n_half=5)
    for m in out:
        assert np.diag(out[m]["value"]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="one residual space"):
        layer_sweep(layers, [x[:, :8] for x in layers], 20, 6, ("cosine",), permutations=2, n_half=2)


# --- dictionaries ------------------------------------------------------------------------------------------
def test_units_of_a_dictionary_and_its_permuted_copy_match_one_to_one():
    from dictlab.analyses.convergence.unit_matching import match_dictionaries, shared_dictionary
    from dictlab.dictionaries.sae import SparseAutoencoder

    a = SparseAutoencoder(16, 40, rule="topk", k=3, seed=0)
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    tensors = {k: v.clone() for k, v in a.tensors().items()}
    for name, v in tensors.items():  # the same units, numbered differently
        if v.shape[:1] == (40,):
            tensors[name] = v[permutation]
        elif v.ndim == 2 and v.shape[1] == 40:
            tensors[name] = v[:, permutation]
    b = SparseAutoencoder.from_saved(tensors, a.config())
    x = torch.randn(24 * 10, 16, generator=torch.Generator().manual_seed(2))
    out = match_dictionaries(a, x, b, x, 24, threshold=0.9, min_active=3, permutations=30, n_boot=50, examples=2,
                             context=lambda side, row: {"before": "", "token": f"{side}{row}", "after": ""})
    assert out["best_above"]["observed"] == 1.0 and out["one_to_one_above"]["observed"] == 1.0
    assert out["best_above"]["null_mean"] < 0.2 and out["best_above"]["p"] == pytest.approx(1 / 31)
    assert out["replicated_r"]["observed"] == pytest.approx(1.0) and out["jaccard_per_token"]["observed"] == 1.0
    inverse = torch.argsort(permutation)
    assert all(inverse[e["a"]] == e["b"] and e["r"] == pytest.approx(1.0, abs=1e-5) for e in out["examples"]["matched"])
    assert out["examples"]["matched"][0]["a_contexts"][0]["token"].startswith("a")
    same = shared_dictionary(a, x, x, 24, [x[:5], x[5:9]], [x[:5], x[5:9]], permutations=20, n_boot=50)
    assert same["jaccard_per_token"]["observed"] == 1.0 and same["jaccard_per_prompt"]["observed"] == 1.0
    assert same["fvu_a"] == same["fvu_b"] and same["jaccard_per_token"]["null_mean"] < 0.5


# --- end to end --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_models(tmp_path_factory, make_model, sentences, write_pile_jsonl_zst):
    """A tiny llama ("base"), a copy with a chat template ("twin", the same weights: every measure at its
    ceiling), and a tiny GPT-2 reading characters ("chars": another vocabulary)."""
    root = tmp_path_factory.mktemp("converge")
    make_model(root / "base", "llama")
    shutil.copytree(root / "base", root / "twin")
    config = json.loads((root / "twin" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}"
    (root / "twin" / "tokenizer_config.json").write_text(json.dumps(config))
    make_model(root / "chars", "gpt2", chars=True)
    write_pile_jsonl_zst(root / "pile" / "train" / "00.jsonl.zst", sentences(160, seed=3, words_per_doc=50))
    return root


def _config(root, name: str, models: list[dict], **extra) -> dict:
    cfg = {"name": name, "corpus": {"source": f"hub:{root / 'pile'}", "eval_fraction": 0.3},
           "models": models, "text": {"documents": 12, "positions": 6, "context_length": 32},
           "representation": {"rsa_positions": 3, "knn_k": 3},
           "behaviour": {"prompts_per_suite": 2, "new_tokens": 4, "temperature": 0.0},
           "dictionaries": {"fit": [{"method": "sae", "latents": [16], "k": 2, "steps": 20, "batch_size": 64,
                                     "lr": 0.01, "warmup_steps": 2}, {"method": "kmeans", "k": [3]}],
                            "train_tokens": 600, "min_active": 2},
           "statistics": {"permutations": 19, "half_samples": 4, "bootstrap": 50}}
    cfg.update(extra)
    return cfg


def test_converge_end_to_end_twin_and_another_vocabulary(three_models, tmp_path, capsys):
    root = three_models
    models = [{"name": "base", "model": str(root / "base"), "dictionary_layer": 1},
              {"name": "twin", "model": str(root / "twin"), "dictionary_layer": 1, "chat": True},
              {"name": "chars", "model": str(root / "chars"), "dictionary_layer": 2}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(root, "three", models, pairs=[["base", "twin"], ["base", "chars"]])))
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "converge", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "base vs twin (one residual space" in printed and "base vs chars (aligned by characters" in printed
    out = json.loads((runs / "three" / "convergence.json").read_text())
    twin, chars = out["pairs"]
    # the same weights: every measure at its ceiling
    nt = twin["behaviour"]["next_token"]
    assert nt["vocabulary"] == "shared" and nt["positions"] == 12 * 6
    assert nt["top1_agreement"]["observed"] == 1.0 and nt["jsd_bits"]["observed"] == pytest.approx(0, abs=1e-6)
    rep = twin["representation"]["metrics"]
    assert set(rep) == {"cka", "svcca", "knn", "rsa", "cosine"}
    for m in rep:
        assert np.diag(rep[m]["value"]) == pytest.approx(1.0, abs=1e-5)
    for matched in twin["dictionaries"]["matched"]:  # the same store and seed: the same dictionary
        assert matched["one_to_one_above"]["observed"] == 1.0
        assert matched["replicated_r"]["observed"] == pytest.approx(1)
    shared = {s["dictionary"]: s for s in twin["dictionaries"]["shared"]}
    assert set(shared) == {"sae-topk-n16-k2", "kmeans-k3"}
    assert all(s["jaccard_per_token"]["observed"] == 1.0 and s["jaccard_per_prompt"]["observed"] == 1.0
               and s["fvu_a"] == s["fvu_b"] for s in shared.values())
    # the twin read the prompts through its chat template (a <bos> from the template), base after its start token
    assert twin["behaviour"]["outputs"]["suites"][-1]["suite"] == "all"
    # another vocabulary: word-aligned positions, no cosine, no shared dictionary
    assert chars["behaviour"]["next_token"]["vocabulary"] == "different (word-aligned)"
    assert 0 < chars["behaviour"]["next_token"]["positions"] < 12 * 6
    assert "cosine" not in chars["representation"]["metrics"] and chars["dictionaries"]["shared"] == []
    assert np.array(chars["representation"]["metrics"]["cka"]["value"]).shape == (3, 3)
    assert chars["dictionaries"]["matched"][0]["site_b"] == "L2.resid_post"
    # every test has a BH q-value, at least its p
    assert out["tests"]["tests"] > 100
    p = np.array(rep["cka"]["p"], dtype=float)
    assert (np.array(rep["cka"]["q"], dtype=float) >= p - 1e-12).all()
    # rerun: nothing recomputed; `dictlab report` rewrites the convergence report
    artifacts = [runs / "three" / "convergence.json", *(runs / "three" / "models").glob("*/*.json")]
    stamps = [f.stat().st_mtime_ns for f in artifacts]
    assert main(["--quiet", "--runs-dir", str(runs), "converge", str(path)]) == 0
    assert [f.stat().st_mtime_ns for f in artifacts] == stamps and len(artifacts) == 7  # passes, generations
    assert main(["report", str(runs / "three")]) == 0
    page = (runs / "three" / "report.html").read_text()
    for heading in ("base vs twin", "base vs chars", "Behaviour", "Representation", "Dictionaries",
                    "One dictionary applied to both models", "How to read this"):
        assert heading in page
    assert page.count("<img") == 4  # heatmaps and depth curves of each pair


def test_bad_convergence_configs_are_refused_before_anything_runs(three_models, tmp_path, capsys):
    root = three_models
    base = {"name": "base", "model": str(root / "base")}
    cases = [
        (_config(root, "x", [base]), "models: List should have at least 2 items"),
        (_config(root, "x", [base, {**base, "layers": [7]}]), "model names must differ"),
        (_config(root, "x", [base, {"name": "b", "model": str(root / "base"), "layers": [7]}]),
         "layer 7 is out of range (it has 3 layers"),
        (_config(root, "x", [base, {"name": "b", "model": str(root / "base")}], pairs=[["base", "c"]]),
         "names 'c', not a model"),
        (_config(root, "x", [base, {"name": "b", "model": str(root / "base"), "start_token": "<nope>"}]),
         "start token '<nope>' is not a token"),
        (_config(root, "x", [base, {"name": "b", "model": str(root / "base"), "chat": True}]),
         "has no chat template"),
    ]
    for i, (cfg, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "converge", str(path)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / "x" / "convergence.json").exists()


def test_the_gemma2_preset_runs_on_tiny_gemma2_models(tmp_path, pile_dir, make_model):
    """configs/gemma2-convergence.yaml as shipped, with its models and Gemma Scope SAEs replaced by tiny
    random Gemma 2 models (a narrow and a wide one, each with an "instruct" copy) and local params.npz files."""
    cfg = yaml.safe_load(open("configs/gemma2-convergence.yaml"))
    g = np.random.default_rng(0)
    for i, m in enumerate(cfg["models"]):
        wide = "9b" in m["name"]
        folder = tmp_path / m["name"]
        make_model(folder, "gemma2", n_layers=4 if wide else 3, hidden=48 if wide else 32, seed=i)
        if m.get("chat"):
            tok = json.loads((folder / "tokenizer_config.json").read_text())
            tok["chat_template"] = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}"
            (folder / "tokenizer_config.json").write_text(json.dumps(tok))
        m.update(model=str(folder), dtype="float32", dictionary_layer=1)
        for entry in m["fit"]:
            if entry["method"] == "sae":
                entry.update(latents=[16], k=2, steps=10, batch_size=64)
            else:  # the Gemma Scope source, as a local params.npz of the tiny model's width
                d = 48 if wide else 32
                npz = tmp_path / "scope" / m["name"] / "params.npz"
                npz.parent.mkdir(parents=True)
                np.savez(npz, W_enc=(g.normal(size=(d, 24)) * 0.3).astype(np.float32),
                         W_dec=(g.normal(size=(24, d)) * 0.3).astype(np.float32), b_enc=np.zeros(24, np.float32),
                         b_dec=np.zeros(d, np.float32), threshold=np.full(24, 0.05, np.float32))
                entry.update(site="L1.resid_post", sources=[str(npz.parent)])
    cfg["corpus"].update(source=f"hub:{pile_dir}", eval_fraction=0.3)
    cfg["text"] = {"documents": 8, "positions": 4, "context_length": 24}
    cfg["representation"].update(positions=None, rsa_positions=2)
    cfg["behaviour"].update(prompts_per_suite=2, new_tokens=3)
    cfg["dictionaries"]["train_tokens"] = 400
    cfg["statistics"] = {"permutations": 9, "half_samples": 3, "bootstrap": 20}
    path = tmp_path / "g2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "converge", str(path)]) == 0
    out = json.loads((tmp_path / "runs" / "gemma2-convergence" / "convergence.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in out["pairs"]}
    assert list(pairs) == [("gemma-2-2b", "gemma-2-2b-it"), ("gemma-2-9b", "gemma-2-9b-it"),
                           ("gemma-2-2b", "gemma-2-9b")]
    small = pairs[("gemma-2-2b", "gemma-2-2b-it")]
    assert small["shared_space"] and "cosine" in small["representation"]["metrics"]
    shared = sorted(s["dictionary"] for s in small["dictionaries"]["shared"])  # the base model's two, on both
    assert shared[0].startswith("pretrained-") and shared[0].endswith("scope-gemma-2-2b")
    assert shared[1] == "sae-topk-n16-k2"
    across = pairs[("gemma-2-2b", "gemma-2-9b")]
    assert not across["shared_space"] and across["behaviour"]["next_token"]["vocabulary"] == "shared"
    assert np.array(across["representation"]["metrics"]["cka"]["value"]).shape == (3, 4)
    assert [m["dictionary"] for m in across["dictionaries"]["matched"]] == ["sae-topk-n16-k2"]


def test_the_shipped_convergence_configs_load():
    from dictlab.config import ConvergeConfig, load_config

    demo = load_config("configs/demo-convergence.yaml", ConvergeConfig)
    assert [m.model for m in demo.models] == ["gemma3-270m", "smollm2-135m-instruct"] and demo.models[1].chat
    preset = load_config("configs/gemma2-convergence.yaml", ConvergeConfig)
    assert {m.model for m in preset.models} == {"google/gemma-2-2b", "google/gemma-2-2b-it", "google/gemma-2-9b",
                                                "google/gemma-2-9b-it"}
