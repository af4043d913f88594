"""Tokens/s of `dictlab extract` against the hand-written way, same model, same tokens, same run.

The peer is what a researcher writes by hand: a transformers full forward in fp32 with
output_hidden_states=True, keeping hidden_states[layer + 1]. dictlab is timed end to end through
`extract()` (model load from the safetensors cache, tokenization, forward, shard writing, manifest)
with its defaults (bf16 compute, stop after the deepest layer), and once more in fp32 so the two
gains (early stop, bf16) can be told apart. The bf16 rows' relative error against fp32 is printed too.

    python bench/extract.py [--tokens 32768] [--layer 8]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from dictlab.data.corpus import CorpusConfig, contexts, documents
from dictlab.data.extract import ExtractConfig, extract
from dictlab.data.lm import bos_id, load_model
from dictlab.data.store import Store


def hand_written(model_spec: str, corpus: CorpusConfig, cfg: ExtractConfig, layer: int) -> tuple[float, torch.Tensor]:
    model, tokenizer = load_model(model_spec, "float32")
    stream = contexts(documents(corpus.source), tokenizer, bos_id(tokenizer), "train",
                      cfg.context_length, corpus.eval_fraction, corpus.seed)
    batches, batch, rows = [], [], 0
    for ctx in stream:  # the same contexts dictlab stores, right-padded where a document ends
        batch.append(ctx.tokens)
        rows += len(ctx.tokens) - 1
        if len(batch) == cfg.batch_size or rows >= cfg.train_tokens:
            width = max(map(len, batch))
            ids = torch.tensor([t + [0] * (width - len(t)) for t in batch])
            mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in batch])
            batches.append((ids, mask))
            batch = []
        if rows >= cfg.train_tokens:
            break
    start = time.perf_counter()
    kept = []
    with torch.no_grad():
        for ids, mask in batches:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            keep = mask.bool()
            keep[:, 0] = False  # BOS is left out, as dictlab does by default
            kept.append(out.hidden_states[layer + 1][keep].clone())
    seconds = time.perf_counter() - start
    return rows / seconds, torch.cat(kept)


def dictlab_run(model_spec, corpus, cfg, folder: Path) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    extract(model_spec, corpus, cfg, folder, progress=False)
    seconds = time.perf_counter() - start
    store = Store(folder)
    return store.rows("train") / seconds, store.load(next(iter(store.sites)), "train")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    torch.manual_seed(0)
    corpus = CorpusConfig(source="embedded")
    base = dict(layers=[args.layer], sites=["resid_post"], train_tokens=args.tokens, eval_tokens=1)
    load_model(args.model)  # make sure the embedded model's cache exists before timing anything
    peer_rate, peer_x = hand_written(args.model, corpus, ExtractConfig(**base), args.layer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bfloat16", "float32"):
            cfg = ExtractConfig(**base, model_dtype=dtype, store_dtype="float32")
            rate, x = dictlab_run(args.model, corpus, cfg, Path(tmp) / dtype)
            rel = float((x - peer_x).norm() / peer_x.norm())
            rows.append((dtype, rate, rel))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {args.model}, layer {args.layer}, {args.tokens} tokens")
    print(f"{'method':<46} {'tokens/s':>9} {'ratio':>6} {'rel. err vs peer':>16}")
    print(f"{'hand-written: full forward fp32, hidden_states':<46} {peer_rate:>9.0f} {1:>6.2f} {0:>16.2e}")
    for dtype, rate, rel in rows:
        name = f"dictlab extract ({dtype}, early stop)"
        print(f"{name:<46} {rate:>9.0f} {rate / peer_rate:>6.2f} {rel:>16.2e}")


if __name__ == "__main__":
    main()
