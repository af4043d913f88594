"""TopK SAE training: dictlab against EleutherAI sparsify, SAELens and a plain dense torch TopK SAE, one
run, same data.

Every SAE starts with b_dec at the data mean (dictlab uses the geometric median), since these
activations' mean carries most of their norm. Same rows (the demo store's layer 8 activations: 200k train,
20k eval; d = 640; scaled once to mean norm √d for everyone), k = 32, batch 4096, the same number of steps,
Adam at lr 3e-4 for all. Reported: training tokens/s, the share of the matmul ceiling (the rate of the
encoder's one dense product [batch, d] x [d, latents] on this machine, measured first: the fastest a
TopK step can be), and the held-out FVU after those steps (each implementation encodes and decodes the
eval split itself). dictlab takes one dense product per step and works over the k active entries
after it, forwards and backwards; sparsify's SparseCoder computes the encoder's gradient sparsely
(scatter of per-entry products) and the decoder by embedding bags; SAELens trains densely; the plain
SAE is what one writes by hand: dense encoder, top-k, scatter, dense decoder.

    cd bench && ../.venv/bin/python sae.py --store ../runs/demo/store [--latents 4096,16384] [--steps 20]
        [--autocast bfloat16]  (dictlab's rate with the encoder product in bf16, on CPUs with native bf16)
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from common import load_rows, machine, peer

from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.dictionaries.train import TrainConfig, tensor_batches, train


def fvu(reconstruct, x: torch.Tensor) -> float:
    with torch.no_grad():
        err = sum(float(((b - reconstruct(b)) ** 2).sum()) for b in x.split(4096))
    return err / float(((x - x.mean(0)) ** 2).sum())


def plain_topk(x, latents, k, steps, batch, lr):
    d = x.shape[1]
    w_enc = torch.nn.Parameter(torch.randn(d, latents) / d**0.5)
    w_dec = torch.nn.Parameter(w_enc.detach().T.clone())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(latents)), torch.nn.Parameter(x[:4096].mean(0).clone())
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=lr)

    def forward(b):
        pre = torch.relu((b - b_dec) @ w_enc + b_enc)
        values, idx = pre.topk(k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, values) @ w_dec + b_dec

    batches = tensor_batches(x, batch)(0)
    start = time.perf_counter()
    for _ in range(steps):
        b = next(batches)
        loss = ((forward(b) - b) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start), forward


def dictlab_topk(x, latents, k, steps, batch, lr, autocast=None):
    sae = SparseAutoencoder(x.shape[1], latents, rule="topk", k=k)
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=0, decay_start=1.0, autocast=autocast)
    start = time.perf_counter()
    train(sae, tensor_batches(x, batch), cfg, progress=False)
    return steps * batch / (time.perf_counter() - start), lambda b: sae.decode(sae.encode(b))


def sparsify_topk(x, latents, k, steps, batch, lr):
    """sparsify's SparseCoder stepped as its trainer steps it: FVU + AuxK loss, Adam, the decoder kept at unit
    norm (its trainer also offers other optimisers; Adam keeps the comparison like for like)."""
    peer("sparsify")
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=latents, k=k))
    with torch.no_grad():
        sae.b_dec.copy_(x[:4096].mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    batches = tensor_batches(x, batch)(0)
    start = time.perf_counter()
    for _ in range(steps):
        out = sae(next(batches))
        opt.zero_grad()
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    rate = steps * batch / (time.perf_counter() - start)
    return rate, lambda b: sae(b).sae_out


def matmul_ceiling(batch: int, d: int, latents: int, dtype: torch.dtype) -> tuple[float, float]:
    """(GFLOP/s of [batch, d] x [d, latents] in `dtype`, the tokens/s a step of that one product allows)."""
    a, b = torch.randn(batch, d).to(dtype), torch.randn(d, latents).to(dtype)
    a @ b
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < 2:
        a @ b
        runs += 1
    seconds = (time.perf_counter() - start) / runs
    return 2 * batch * d * latents / seconds / 1e9, batch / seconds


def saelens_topk(x, latents, k, steps, batch, lr):
    sae_lens = peer("sae_lens")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = sae_lens.TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=latents, k=k)
    sae = sae_lens.TrainingSAE.from_dict(cfg.to_dict())
    with torch.no_grad():  # as the other two start: b_dec at the data mean (SAELens starts at zero)
        sae.b_dec.copy_(x[:4096].mean(0))
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr,
                                   lr_end=lr,
                                   device="cpu", logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(trainer_cfg, sae, tensor_batches(x, batch)(0))
    start = time.perf_counter()
    trainer.fit()
    rate = steps * batch / (time.perf_counter() - start)
    return rate, lambda b: sae.decode(sae.encode(b))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/store")
    p.add_argument("--latents", default="4096,16384")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--repeats", type=int, default=3, help="runs per method, interleaved; the median rate is shown")
    p.add_argument("--autocast", choices=["bfloat16"], help="also time dictlab with the encoder product in bf16")
    args = p.parse_args()
    x, what = load_rows(args.store, 200_000, 640)
    held, held_what = load_rows(args.store, 20_000, 640, seed=1, split="eval")
    # every method gets the same rows scaled to mean norm √d (dictlab would do it itself; SAELens
    # does not by default, and raw Gemma activations of norm ~5000 stall it at this learning rate)
    scale = x.shape[1] ** 0.5 / float(x.norm(dim=1).mean())
    x, held = x * scale, held * scale
    print(f"train: {what}; eval: {held_what}; {machine()}; k={args.k}, batch {args.batch}, {args.steps} steps, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'latents':>7} {'method':<30} {'tokens/s':>9} {'vs sparsify':>11} {'of ceiling':>10} {'held-out FVU':>13}")
    methods = [("sparsify SparseCoder TopK", sparsify_topk), ("SAELens TopK", saelens_topk),
               ("plain torch TopK (dense)", plain_topk), ("dictlab TopK", dictlab_topk)]
    if args.autocast:
        methods.append((f"dictlab TopK ({args.autocast})", partial(dictlab_topk, autocast=args.autocast)))
    for latents in map(int, args.latents.split(",")):
        gflops, ceiling = matmul_ceiling(args.batch, x.shape[1], latents, torch.float32)
        gflops16, ceiling16 = (matmul_ceiling(args.batch, x.shape[1], latents, torch.bfloat16) if args.autocast
                               else (0, 0))
        print(f"{latents:>7} matmul ceiling: fp32 {gflops:.0f} GFLOP/s = {ceiling:.0f} tokens/s"
              + (f"; bf16 {gflops16:.0f} GFLOP/s = {ceiling16:.0f} tokens/s" if args.autocast else ""))
        rates, fvus = {name: [] for name, _ in methods}, {}
        for _ in range(args.repeats):  # interleaved, so that a noisy stretch of the machine hits every method
            for name, fn in methods:
                torch.manual_seed(0)
                rate, reconstruct = fn(x, latents, args.k, args.steps, args.batch, args.lr)
                rates[name].append(rate)
                fvus[name] = fvu(reconstruct, held)  # the same every repeat: the same seed and batches
        rows = [(name, statistics.median(rates[name]), fvus[name]) for name, _ in methods]
        base = rows[0][1]
        for name, rate, f in rows:
            top = ceiling16 if "bfloat16" in name else ceiling
            print(f"{latents:>7} {name:<30} {rate:>9.0f} {rate / base:>10.2f}x {rate / top:>9.0%} {f:>13.4f}")


if __name__ == "__main__":
    main()
