"""TopK SAE training: dictlab against SAELens and a plain dense torch TopK SAE, one run, same data.

Every SAE starts with b_dec at the data mean (dictlab uses the geometric median), since these
activations' mean carries most of their norm. Same rows (the demo store's layer 8 activations: 200k train,
20k eval; d = 640; scaled once to mean norm √d for everyone), k = 32, batch 4096, the same number of steps,
Adam at lr 3e-4 for all three. Reported: training tokens/s and the
held-out FVU after those steps (each implementation encodes and decodes the eval split itself).
dictlab normalises inputs to mean norm √d and decodes sparsely (gather-and-sum of the k active rows);
the plain SAE is what one writes by hand: dense encoder, top-k, scatter, dense decoder.

    cd bench && ../.venv/bin/python sae.py --store ../runs/demo/store [--latents 4096,16384] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

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


def dictlab_topk(x, latents, k, steps, batch, lr):
    sae = SparseAutoencoder(x.shape[1], latents, rule="topk", k=k)
    start = time.perf_counter()
    train(sae, tensor_batches(x, batch), TrainConfig(steps=steps, lr=lr, warmup_steps=0, decay_start=1.0),
          progress=False)
    return steps * batch / (time.perf_counter() - start), lambda b: sae.decode(sae.encode(b))


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
    args = p.parse_args()
    x, what = load_rows(args.store, 200_000, 640)
    held, held_what = load_rows(args.store, 20_000, 640, seed=1, split="eval")
    # every method gets the same rows scaled to mean norm √d (dictlab would do it itself; SAELens
    # does not by default, and raw Gemma activations of norm ~5000 stall it at this learning rate)
    scale = x.shape[1] ** 0.5 / float(x.norm(dim=1).mean())
    x, held = x * scale, held * scale
    print(f"train: {what}; eval: {held_what}; {machine()}; k={args.k}, batch {args.batch}, {args.steps} steps")
    print(f"{'latents':>7} {'method':<26} {'tokens/s':>9} {'vs SAELens':>10} {'held-out FVU':>13}")
    for latents in map(int, args.latents.split(",")):
        rows = []
        for name, fn in (("SAELens TopK", saelens_topk), ("plain torch TopK (dense)", plain_topk),
                         ("dictlab TopK", dictlab_topk)):
            torch.manual_seed(0)
            rate, reconstruct = fn(x, latents, args.k, args.steps, args.batch, args.lr)
            rows.append((name, rate, fvu(reconstruct, held)))
        base = rows[0][1]
        for name, rate, f in rows:
            print(f"{latents:>7} {name:<26} {rate:>9.0f} {rate / base:>9.2f}x {f:>13.4f}")


if __name__ == "__main__":
    main()
