import pytest
import torch

from dictlab.data.lm import SITE_KINDS, ActivationCapture, Site, load_model, make_sites, parse_site
from dictlab.errors import DictlabError

FINAL_NORM = {"gpt2": "transformer.ln_f"}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("stop_early", [True, False])
def test_hooked_sites_equal_hidden_states(tiny_models, arch, stop_early):
    model, _ = load_model(str(tiny_models[arch]))
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    acts = ActivationCapture(model, make_sites(list(range(n)), list(SITE_KINDS))).run(ids, stop_early=stop_early)
    final_norm = model.get_submodule(FINAL_NORM.get(arch, "model.norm"))
    for layer in range(n):
        a = {kind: acts[f"L{layer}.{kind}"] for kind in SITE_KINDS}
        assert torch.equal(a["resid_pre"], hidden[layer])
        # hidden_states[-1] has the final norm applied; every other one is a layer's raw output
        post = final_norm(a["resid_post"]) if layer == n - 1 else a["resid_post"]
        assert torch.equal(post, hidden[layer + 1])
        # attn_out / mlp_out are exactly what is added to the residual stream
        assert torch.equal(a["resid_pre"] + a["attn_out"], a["resid_mid"])
        assert torch.equal(a["resid_mid"] + a["mlp_out"], a["resid_post"])


def test_early_stop_skips_later_layers_and_head(tiny_models):
    model, _ = load_model(str(tiny_models["llama"]))
    calls = []
    handles = [model.get_submodule(p).register_forward_hook(lambda *a, p=p: calls.append(p))
               for p in ("model.layers.0", "model.layers.1", "model.layers.2", "lm_head")]
    ids = torch.randint(4, 60, (1, 8))
    ActivationCapture(model, make_sites([1], ["resid_post"])).run(ids)
    assert calls == ["model.layers.0", "model.layers.1"]
    calls.clear()
    ActivationCapture(model, make_sites([1], ["resid_post"])).run(ids, stop_early=False)
    assert calls == ["model.layers.0", "model.layers.1", "model.layers.2", "lm_head"]
    for h in handles:
        h.remove()


def test_site_names_and_aliases(tiny_models):
    assert parse_site("L2.mlp_out") == Site(2, "mlp_out")
    assert parse_site("blocks.12.hook_resid_post") == Site(12, "resid_post")
    assert parse_site("model.layers.1.mlp") == Site(None, module="model.layers.1.mlp")
    model, _ = load_model(str(tiny_models["gemma2"]))
    ids = torch.randint(4, 60, (1, 6))
    cap = ActivationCapture(model, [parse_site("model.layers.1.post_feedforward_layernorm"), parse_site("L1.mlp_out")])
    assert cap.stop_layer == 1
    acts = cap.run(ids)
    assert torch.equal(acts["model.layers.1.post_feedforward_layernorm"], acts["L1.mlp_out"])


def test_bad_sites_name_what_is_accepted(tiny_models):
    model, _ = load_model(str(tiny_models["llama"]))
    with pytest.raises(DictlabError, match=r"layer 7 is out of range: the model has 3 layers \(0..2\)"):
        ActivationCapture(model, make_sites([7], ["resid_post"]))
    with pytest.raises(DictlabError, match="unknown site 'resid_middle'.*resid_mid"):
        make_sites([0], ["resid_middle"])
    with pytest.raises(DictlabError, match="unknown site 'hook_foo'|unknown site 'foo'"):
        parse_site("blocks.1.hook_foo")
    with pytest.raises(DictlabError, match="no module 'model.nope'"):
        ActivationCapture(model, [parse_site("model.nope")])


def test_unknown_model_alias():
    with pytest.raises(DictlabError, match="unknown model 'gemma-tiny'.*gemma3-270m"):
        load_model("gemma-tiny")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gemma3_text"])
def test_run_to_final_and_next_token_logits_equal_the_model_forward(tiny_models, arch):
    """Logits from the final hidden states, on chosen rows only (Gemma 2's soft-capping included), equal the
    model's own; the captured sites equal its hidden states."""
    from dictlab.data.lm import next_token_logits

    model, _ = load_model(str(tiny_models[arch]))
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    captured, final = ActivationCapture(model, make_sites([0, 1], ["resid_post"])).run_to_final(ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(next_token_logits(model, final[mask.bool()]), out.logits[mask.bool()])
    assert torch.equal(captured["L0.resid_post"], out.hidden_states[1])
    if arch == "gemma2":
        assert model.config.final_logit_softcapping  # the path that caps
