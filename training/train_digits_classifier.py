"""Train the digits classifier that ``fastdiff.metrics`` uses to judge ``builtin:digits`` samples.

    python training/train_digits_classifier.py --out fastdiff/presets/digits --seed 0

Trained on the fixed train split of ``fastdiff.metrics.data`` (80%), accuracy reported on the held-out
20%. Augmentation: random shifts of up to 1 pixel and a little Gaussian pixel noise, so that the
classifier judges a generated digit's shape rather than its exact placement or texture. About a minute
on one CPU core. Writes ``classifier.safetensors`` + ``classifier.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from fastdiff.metrics.data import load_digits_16
from fastdiff.metrics.digits import ClassifierConfig, DigitsClassifier, save_classifier


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1, noise: float = 0.1) -> torch.Tensor:
    """Per-image random integer shift (background-padded with -1) plus Gaussian pixel noise."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    h, w = x.shape[-2:]
    out = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return (out + noise * torch.randn(out.shape, generator=gen)).clamp(-1, 1)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).double().mean())
    model.train()
    return acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="fastdiff/presets/digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_tr, y_tr = load_digits_16("train")
    x_te, y_te = load_digits_16("test")
    cfg = ClassifierConfig()
    model = DigitsClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    steps_per_epoch = len(x_tr) // args.batch
    total = args.epochs * steps_per_epoch
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(augment(x_tr[idx], gen)), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out accuracy {accuracy(model, x_te, y_te):.4f}  "
                  f"{time.time() - t0:.0f} s", flush=True)
    model.eval()
    info = {"seed": args.seed, "epochs": args.epochs, "steps": step, "train_images": len(x_tr),
            "test_images": len(x_te), "test_accuracy": accuracy(model, x_te, y_te),
            "train_accuracy": accuracy(model, x_tr, y_tr), "wall_time_s": round(time.time() - t0, 1),
            "data": "fastdiff.metrics.data.load_digits_16 (bilinear 16x16, [-1, 1]; split seed 0, 20% test)",
            "param_count": sum(p.numel() for p in model.parameters())}
    os.makedirs(args.out, exist_ok=True)
    save_classifier(model, args.out, info)
    print(f"saved {args.out}: held-out accuracy {info['test_accuracy']:.4f}, {info['param_count']:,} parameters")


if __name__ == "__main__":
    main()
