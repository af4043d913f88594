"""The CE stage: next-token CE and KL with reconstructions spliced in, on the demo store's eval contexts.

Three ways over the same batches and the same variants (clean; zero and mean ablation of the site;
each dictionary spliced in, and its error added back on the first batch):
  by hand         model(...).logits for every variant, log_softmax, torch's kl_div: what one writes first
  dictlab, full   every variant a full forward; the unembedding by vocabulary blocks, reduced in cache
  dictlab, shared the layers before the site run once per batch, every variant resumes from there
The two dictlab rows must agree to the bit (printed); by hand agrees to float rounding. The dictionaries
are k-means at K = 64 and 256 (10 Lloyd iterations) and a TopK SAE (1024 latents, k = 32, 100 steps),
fitted here on the store's train split: what they are does not change the cost, only that they are there.

    cd bench && ../.venv/bin/python ce.py --store ../runs/demo/store [--site L8.resid_post] [--contexts 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine

from dictlab.data.lm import SiteEditor
from dictlab.data.store import Store
from dictlab.dictionaries import KMeans
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.dictionaries.train import TrainConfig, tensor_batches, train
from dictlab.measures.downstream import Spliced, eval_context_batches, next_token_losses, variants


@torch.no_grad()
def by_hand(model, batches, edits, first_batch_only) -> dict:
    sums = {name: [0.0, 0.0, 0] for name in ["clean", *edits]}
    for i, (ids, mask) in enumerate(batches):
        valid = mask[:, 1:].bool()
        clean = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        for name, edit in [("clean", []), *edits.items()]:
            if i > 0 and name in first_batch_only:
                continue
            with SiteEditor(model, edit):
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
            kl = torch.nn.functional.kl_div(logp, clean, log_target=True, reduction="none").sum(-1)
            sums[name][0] += float(nll[valid].double().sum())
            sums[name][1] += float(kl[valid].double().sum())
            sums[name][2] += int(valid.sum())
    return {name: {"ce": ce / n, "kl": kl / n} for name, (ce, kl, n) in sums.items()}


def dictionaries(store: Store, site: str) -> dict:
    x = store.load(site, "train", max_rows=50_000)
    out = {f"kmeans-{k}": KMeans(k, max_iter=10, seed=0).fit(x, progress=False) for k in (64, 256)}
    sae = SparseAutoencoder(x.shape[1], 1024, rule="topk", k=32)
    train(sae, tensor_batches(x, 2048), TrainConfig(steps=100, lr=1e-3, warmup_steps=10), progress=False)
    out["sae-topk-n1024-k32"] = sae
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/store")
    p.add_argument("--site", default="L8.resid_post")
    p.add_argument("--contexts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    store = Store(args.store)
    model, _, batches = eval_context_batches(store, args.contexts, args.batch_size)
    mean = sum(b.double().sum(0) for b in store.batches(args.site, "eval", 8192)) / store.rows("eval")
    spliced = {name: Spliced(d, args.site, args.site) for name, d in dictionaries(store, args.site).items()}
    edits = variants(spliced, {args.site: mean.float()})
    checks = {e for e in edits if e.startswith("error_added:")}
    forwards = len(batches) * (1 + len(edits)) - (len(batches) - 1) * len(checks)
    print(f"{store.manifest['spec']['model']} {args.site}, model in {store.model_dtype}; {args.contexts} contexts "
          f"in batches of {args.batch_size}; {forwards} forwards ({len(edits)} variants); {machine()}")
    results = {}
    for name, run in (("by hand (model logits)", lambda: by_hand(model, batches, edits, checks)),
                      ("dictlab, full forwards", lambda: next_token_losses(model, batches, edits, checks, False,
                                                                           share_prefix=False)),
                      ("dictlab, shared prefix", lambda: next_token_losses(model, batches, edits, checks, False))):
        start = time.perf_counter()
        losses = run()
        results[name] = (time.perf_counter() - start, losses)
    base = results["by hand (model logits)"][0]
    print(f"{'method':<24} {'s':>7} {'s/forward':>9} {'speed-up':>8}  CE clean / spliced {next(iter(spliced))}")
    for name, (seconds, losses) in results.items():
        first = f"spliced:{next(iter(spliced))}"
        print(f"{name:<24} {seconds:>7.1f} {seconds / forwards:>9.2f} {base / seconds:>7.2f}x  "
              f"{losses['clean']['ce']:.6f} / {losses[first]['ce']:.6f}")
    full, shared = results["dictlab, full forwards"][1], results["dictlab, shared prefix"][1]
    print("shared prefix equals full forwards bitwise:", full == shared)


if __name__ == "__main__":
    main()
