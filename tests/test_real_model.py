"""End to end on the real embedded model (Gemma 3 270M, dequantized from its packaged GGUF)."""

import json

import numpy as np
import pytest
import torch
import yaml

from dictlab.cli import main
from dictlab.data.lm import SITE_KINDS, ActivationCapture, load_model, make_sites

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m", "float32")


def test_real_gemma3_sites_match_hidden_states(gemma3):
    model, tok = gemma3
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id and model.config.num_hidden_layers == 18
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    acts = ActivationCapture(model, make_sites([8], list(SITE_KINDS))).run(ids)
    assert torch.equal(acts["L8.resid_pre"], hidden[8]) and torch.equal(acts["L8.resid_post"], hidden[9])
    assert torch.equal(acts["L8.resid_pre"] + acts["L8.attn_out"], acts["L8.resid_mid"])
    assert torch.equal(acts["L8.resid_mid"] + acts["L8.mlp_out"], acts["L8.resid_post"])
    norms = acts["L8.resid_post"][0].norm(dim=-1)
    assert norms[0] > 5 * norms[1:].median()  # why BOS is left out of the store


def test_logit_lens_on_the_real_vocabulary_equals_the_float32_closed_form(gemma3):
    from dictlab.data.lm import ARCHITECTURES
    from dictlab.interpret.units import logit_lens

    model, _ = gemma3
    unembed = model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(0)
    # random directions, and directions near token embeddings (sharp logit-lens peaks)
    d = torch.cat([torch.randn(8, unembed.shape[1], generator=g), unembed[[100, 2000, 30000]] * 50])
    path = ARCHITECTURES[model.config.model_type].final_norm
    lens = logit_lens(model, d, path, k=8)
    with torch.no_grad():
        logits = model.get_submodule(path)(d) @ unembed.T
    assert unembed.shape[0] > 200_000
    assert torch.equal(lens["top_ids"], logits.topk(8, dim=1).indices)
    assert torch.equal(lens["bottom_ids"], logits.topk(8, dim=1, largest=False).indices)
    torch.testing.assert_close(lens["bottom_logits"], logits.topk(8, dim=1, largest=False).values)


def test_demo_config_on_a_few_hundred_tokens(tmp_path, capsys):
    cfg = yaml.safe_load(open("configs/demo.yaml"))
    # float32: on CPUs without bfloat16 units (AVX2 only) the demo's bfloat16 runs ~8x slower
    cfg["extract"].update(train_tokens=600, eval_tokens=200, model_dtype="float32")
    sae = {"method": "sae", "latents": [64], "k": 8, "steps": 20, "batch_size": 128, "lr": 1e-3}
    cfg["fit"] = [{"method": "kmeans", "k": [4, 16], "site": "L8.resid_post"},
                  {**sae, "site": "L8.resid_mid", "target_site": "L8.mlp_out"},
                  {**sae, "site": "L4.resid_post"}, {**sae, "site": "L8.resid_post"}]
    layer4, layer8 = "L4.resid_post/sae-topk-n64-k8", "L8.resid_post/sae-topk-n64-k8"
    assert cfg["graph"]["dictionaries"] and cfg["steer"]["downstream"]  # the demo's blocks, on these small SAEs:
    cfg["graph"].update(dictionaries=[layer4, layer8], min_r=0.1, min_count=2)
    cfg["steer"].update(dictionary=layer4, downstream=layer8, n_units=1, alphas=[1.0], contexts=2, new_tokens=3)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "--runs-dir", str(tmp_path), "run", str(path)]) == 0
    assert "L8.resid_post" in capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    assert [(r["n_latents"], r["decoding"]) for r in results] == [(4, "centroid"), (4, "gain_shape"),
                                                                   (16, "centroid"), (16, "gain_shape"), (64, None),
                                                                   (64, None), (64, None)]
    for r in results[:4]:
        assert 0 < r["fvu"] < 1 and r["cosine"] > 0.3 and r["l0"] == 1
    assert results[4]["method"] == "transcoder-topk" and results[4]["l0"] == 8 and results[4]["fvu"] > 0
    # graphs within and across layers 4 and 8 of the real model, and steering a layer-4 unit
    run = tmp_path / "demo"
    assert len(list(run.glob("graphs/*/summary.json"))) == 3
    steering = json.loads((run / "steering.json").read_text())
    plain = next(r for r in steering["steering"] if r["mode"] == "plain")
    assert plain["target"][0] > 0 and plain["kl"][0] > 0 and plain["downstream_drift"][0] > 0
    assert all(len(t["text"]) > 0 for t in steering["generations"]["steered"])
    assert "Steering and ablation" in (run / "report.html").read_text()


def test_embedded_smollm2_instruct_loads_and_its_sites_match_hidden_states():
    model, tok = load_model("smollm2-135m-instruct", "float32")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and tok.is_fast  # fast: character offsets for cross-model alignment
    ids = tok("def read_config(path):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        out = ActivationCapture(model, make_sites([15], ["resid_mid", "resid_post"])).run(ids)
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out["L15.resid_post"], hidden[16])
    assert tok.decode(greedy[0, ids.shape[1]:]).strip()  # a real instruct model continues the code


def test_demo_convergence_config_on_the_two_embedded_models(tmp_path, capsys):
    """configs/demo-convergence.yaml made small: Gemma 3 270M against SmolLM2-135M-Instruct, two tokenizers."""
    cfg = yaml.safe_load(open("configs/demo-convergence.yaml"))
    cfg["text"].update(documents=8, positions=6)
    cfg["representation"].update(positions=6, rsa_positions=3)
    for m, layers in zip(cfg["models"], ([4, 8], [7, 14])):
        m["layers"] = layers
    cfg["behaviour"].update(prompts_per_suite=2, new_tokens=4)
    cfg["dictionaries"]["train_tokens"] = 600
    for entry in cfg["dictionaries"]["fit"]:
        entry.update(steps=5, batch_size=128, warmup_steps=1) if entry["method"] == "sae" else entry.update(k=[8])
    cfg["dictionaries"]["min_active"] = 2
    cfg["statistics"] = {"permutations": 9, "half_samples": 3, "bootstrap": 20}
    path = tmp_path / "conv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "--runs-dir", str(tmp_path), "converge", str(path)]) == 0
    assert "gemma3-270m vs smollm2-135m-instruct (aligned by characters" in capsys.readouterr().out
    out = json.loads((tmp_path / "demo-convergence" / "convergence.json").read_text())
    pair, = out["pairs"]
    assert not pair["shared_space"] and out["models"][1]["start_token"] == "<|endoftext|>"
    nt = pair["behaviour"]["next_token"]
    assert nt["vocabulary"] == "different (word-aligned)" and nt["positions"] > 0 and 0.3 < nt["top_k_mass_a"] <= 1
    # the two models' outputs, the instruct one through its chat template, and their similarity per suite
    generations = json.loads((tmp_path / "demo-convergence" / "models" / "smollm2-135m-instruct" /
                              "generations.json").read_text())["outputs"]
    assert len(generations) == 10 and any(g.strip() for g in generations)
    assert [s["suite"] for s in pair["behaviour"]["outputs"]["suites"]][-1] == "all"
    rep = pair["representation"]["metrics"]
    assert set(rep) == {"cka", "svcca", "knn", "rsa"} and np.array(rep["cka"]["value"]).shape == (2, 2)
    assert [m["dictionary"] for m in pair["dictionaries"]["matched"]] == ["sae-topk-n1024-k32", "kmeans-k8"]
    assert (tmp_path / "demo-convergence" / "report.html").exists()
