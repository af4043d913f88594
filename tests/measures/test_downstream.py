import pytest
import torch

from dictlab.data.lm import SITE_KINDS, ActivationCapture, Edit, SiteEditor, load_model, parse_site
from dictlab.dictionaries.base import Dictionary
from dictlab.measures.downstream import (
    Spliced,
    context_documents,
    next_token_losses,
    padded_batches,
    recovered,
    store_contexts,
    variants,
)


class Scaled(Dictionary):
    """x̂ = s·x exactly: s = 1 is the identity dictionary, s = 0 the zero one."""

    kind = "scaled_for_tests"

    def __init__(self, d: int, s: float):
        self.d, self.s = d, s

    @property
    def directions(self):
        return torch.eye(self.d)

    def encode_sparse(self, x):
        return x * self.s, torch.arange(self.d).expand(x.shape[0], -1)

    def tensors(self):
        return {}

    def config(self):
        return {"d": self.d, "s": self.s}

    @classmethod
    def from_saved(cls, tensors, config):
        return cls(config["d"], config["s"])


def batch(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    contexts = [torch.randint(3, vocab, (n,), generator=g) for n in (12, 9, 12)]
    return list(padded_batches(contexts, 2, pad=0))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gemma3_text"])
def test_editing_a_site_sets_exactly_that_site_and_the_identity_changes_nothing(arch, tiny_models):
    model, _ = load_model(str(tiny_models[arch]))
    ids, mask = batch()[0]
    clean = model(input_ids=ids, attention_mask=mask).logits
    for kind in SITE_KINDS:
        site = parse_site(f"L1.{kind}")
        with SiteEditor(model, [Edit(site, site, lambda r, c: c)]):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, clean), kind
        # doubling the site: the model sees 2x there, and the residual stream carries it on
        before = ActivationCapture(model, [site]).run(ids, mask, stop_early=False)[site.name]
        with SiteEditor(model, [Edit(site, site, lambda r, c: 2 * c)]):
            seen = ActivationCapture(model, [site, parse_site("L1.resid_post")]).run(ids, mask, stop_early=False)
            changed = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(seen[site.name], 2 * before, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(changed, clean), kind
    # resid_mid written: what the layer adds its MLP output to is the new value
    mid, post, mlp = (parse_site(f"L1.{k}") for k in ("resid_mid", "resid_post", "mlp_out"))
    with SiteEditor(model, [Edit(mid, mid, lambda r, c: torch.zeros_like(c))]):
        seen = ActivationCapture(model, [post, mlp]).run(ids, mask, stop_early=False)
    torch.testing.assert_close(seen[post.name], seen[mlp.name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gemma3_text"])
def test_sharing_the_layers_before_the_edits_changes_no_bit(arch, tiny_models):
    # Gemma 2 and 3 alternate sliding-window and global layers: the resumed forward must keep each layer's mask
    model, _ = load_model(str(tiny_models[arch]))
    last = model.config.num_hidden_layers - 1
    shift = lambda r, c: c + 0.5 * r.roll(1, dims=-1)  # noqa: E731  (not a rescaling, which a final norm undoes)
    site = {kind: parse_site(f"L{last}.{kind}") for kind in SITE_KINDS}
    edits = {kind: [Edit(site[kind], site[kind], shift)] for kind in SITE_KINDS}
    edits["transcoder"] = [Edit(site["resid_mid"], site["mlp_out"], shift)]
    edits["two sites"] = [Edit(site["resid_pre"], site["resid_pre"], shift),
                          Edit(site["mlp_out"], site["mlp_out"], shift)]
    shared = next_token_losses(model, batch(), edits, progress=False)
    full = next_token_losses(model, batch(), edits, progress=False, share_prefix=False)
    assert shared == full  # every CE and KL, to the bit
    assert all(full[name]["kl"] > 1e-6 for name in edits)  # and every edit took effect
    # the same through a prefix that ends earlier: an edit reading an earlier layer moves the start back
    edits["reads earlier"] = [Edit(parse_site(f"L{last - 1}.resid_post"), site["resid_post"], shift)]
    assert next_token_losses(model, batch(), edits, progress=False) == next_token_losses(
        model, batch(), edits, progress=False, share_prefix=False)


def test_a_transcoder_edit_reads_one_site_and_writes_another(tiny_models):
    model, _ = load_model(str(tiny_models["llama"]))
    ids, mask = batch()[0]
    mid, mlp = parse_site("L1.resid_mid"), parse_site("L1.mlp_out")
    with SiteEditor(model, [Edit(mid, mlp, lambda read, cur: read)]):  # mlp_out := resid_mid
        seen = ActivationCapture(model, [mid, mlp]).run(ids, mask, stop_early=False)
    torch.testing.assert_close(seen[mlp.name], seen[mid.name])


def test_identity_recovers_all_of_the_loss_and_zero_none(tiny_models):
    model, _ = load_model(str(tiny_models["gemma2"]))
    d = model.config.hidden_size
    site = "L1.resid_post"
    spliced = {"identity": Spliced(Scaled(d, 1.0), site, site), "zero": Spliced(Scaled(d, 0.0), site, site),
               "half": Spliced(Scaled(d, 0.5), site, site)}
    means = {site: torch.randn(d, generator=torch.Generator().manual_seed(1))}
    edits = variants(spliced, means)
    losses = next_token_losses(model, batch(), edits, {e for e in edits if e.startswith("error_added")}, progress=False)
    ident, zero, half = (recovered(losses, name, site) for name in ("identity", "zero", "half"))
    assert ident["ce_recovered_vs_zero"] == pytest.approx(1, abs=1e-6)
    assert ident["ce_recovered_vs_mean"] == pytest.approx(1, abs=1e-6)
    assert ident["kl_spliced"] == pytest.approx(0, abs=1e-6)
    assert zero["ce_recovered_vs_zero"] == pytest.approx(0, abs=1e-9)
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero_ablated"], rel=1e-9)
    assert zero["ce_zero_ablated"] != pytest.approx(zero["ce_mean_ablated"])
    for r in (ident, zero, half):  # adding the error back gives the clean model
        assert r["error_added_ce_gap"] == pytest.approx(0, abs=1e-5)
    assert losses["clean_first_batch"]["ce"] != pytest.approx(losses["clean"]["ce"])  # a check on one batch only
    assert half["kl_spliced"] > 0
    # the numbers are means over every predicted token of the padded batches: recompute CE_clean by hand
    total, count = 0.0, 0
    for ids, mask in batch():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        total += float(nll[mask[:, 1:].bool()].sum())
        count += int(mask[:, 1:].sum())
    assert ident["ce_clean"] == pytest.approx(total / count, rel=1e-6)
    kl, count = 0.0, 0  # and the KL of the half-scale splice, by torch's kl_div
    for ids, mask in batch():
        clean = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        with SiteEditor(model, edits["spliced:half"]):
            half_logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        per_token = torch.nn.functional.kl_div(half_logp, clean, log_target=True, reduction="none").sum(-1)
        kl += float(per_token[mask[:, 1:].bool()].sum())
        count += int(mask[:, 1:].sum())
    assert half["kl_spliced"] == pytest.approx(kl / count, rel=1e-4)


def test_contexts_are_rebuilt_from_the_store_with_bos(tmp_path, pile_dir, tiny_models):
    from dictlab.data.corpus import CorpusConfig, contexts, documents
    from dictlab.data.extract import ExtractConfig, extract
    from dictlab.data.store import Store

    corpus = CorpusConfig(source=f"hub:{pile_dir}", eval_fraction=0.2)
    cfg = ExtractConfig(layers=[1], context_length=16, train_tokens=100, eval_tokens=120, model_dtype="float32")
    store = Store(extract(str(tiny_models["llama"]), corpus, cfg, tmp_path / "store", progress=False))
    _, tokenizer = load_model(str(tiny_models["llama"]))
    rebuilt = store_contexts(store, "eval", 5, tokenizer.bos_token_id)
    stream = [c for c in contexts(documents(corpus.source), tokenizer, tokenizer.bos_token_id, "eval", 16, 0.2,
                                  corpus.seed)][:len(store_contexts(store, "eval", 10**6, tokenizer.bos_token_id))]
    # one context per document in turn: the first context of every document, then the second ones, ...
    rank = {c.index: sum(1 for o in stream[:i] if o.doc == c.doc) for i, c in enumerate(stream)}
    expected = sorted(stream, key=lambda c: (rank[c.index], c.index))[:5]
    assert len({c.doc for c in stream}) < len(stream)  # some documents hold several contexts here
    assert [r.tolist() for r in rebuilt] == [c.tokens for c in expected]
    assert context_documents(store, "eval", 5) == [c.doc for c in expected]


def test_next_token_scores_stay_on_the_device_of_the_hidden_states(monkeypatch):
    """On a GPU every buffer of the CE reduction must live beside the logits; "meta" refuses to mix with
    CPU tensors, so a buffer made on the CPU fails here too."""
    from types import SimpleNamespace

    import torch.fx.experimental._config as fx_config

    from dictlab.measures.downstream import NextTokenScores

    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)  # boolean masks on meta tensors

    head = torch.nn.Linear(8, 20_000, bias=False, device="meta")  # more than one vocabulary block
    model = SimpleNamespace(get_output_embeddings=lambda: head, config=SimpleNamespace())
    hidden = torch.empty(5, 8, device="meta")
    targets = torch.zeros(5, dtype=torch.long, device="meta")
    clean = NextTokenScores.clean(model, hidden, targets)
    assert clean.logits.device.type == clean.lse.device.type == clean.nll.device.type == "meta"
    watch = torch.tensor([1, 9000], device="meta")
    nll, kl, mass = clean.edited(model, hidden, targets, watch)
    assert nll.device.type == kl.device.type == mass.device.type == clean.mass(watch).device.type == "meta"
