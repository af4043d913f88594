"""End to end on the real embedded model (Gemma 3 270M, dequantized from its packaged GGUF)."""

import json

import pytest
import torch
import yaml

from dictlab.cli import main
from dictlab.lm import SITE_KINDS, ActivationCapture, load_model, make_sites

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
    from dictlab.interpret import logit_lens
    from dictlab.lm import ARCHITECTURES

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
    cfg["extract"].update(train_tokens=600, eval_tokens=200)
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
