"""Train ``builtin:digits``: a small class-conditional UNet on scikit-learn's digits, 16x16, 1 channel.

    python training/train_digits.py --out fastdiff/presets/digits --seed 0 --minutes 50
    python training/train_digits.py --objective flow --out fastdiff/presets/digits_flow --seed 0 --minutes 50

Choices (recorded in the saved spec and in ``training_log.json``):

* Data: the 1,797 digits, bilinear-upsampled to 16x16, in [-1, 1] (``fastdiff.metrics.data``); all of
  them are used (the classifier that judges samples is trained on its own fixed split).
* Objective: v-prediction on the 1000-step cosine schedule (``squaredcos_cap_v2``). The cosine schedule
  reaches (almost) zero SNR at t=999, where an epsilon model's x0 estimate is ill-conditioned; v stays
  well-posed there, which matters for the few-step samplers this model exists to exercise.
* ``--objective flow`` (``builtin:digits_flow``): the same network as a flow-matching (rectified flow) model,
  x_t = (1 - t) x0 + t noise with t ~ U(0, 1), trained to predict the velocity noise - x0 at timestep 1000 t
  (diffusers' FlowMatchEulerDiscreteScheduler convention, shift 1): the real flow model the flow samplers are
  measured on.
* Classifier-free guidance: labels are replaced by the null label 10 with probability ``--p-uncond``.
* AdamW (lr 2e-3, batch 128), linear warm-up then cosine decay to 5% over the run's progress (below);
  an EMA of the weights (decay 0.999) is what is saved.
* Reproducibility: one seed drives weight init, the batch order (a torch.Generator on the CPU), the
  timesteps and the noise; ``torch.set_num_threads`` defaults to 1.
* Budget: training progress is ``max(step / --steps, elapsed / --minutes)``; the learning-rate schedule
  follows it and the run stops, saves and says so when it reaches 1. On an idle 2-core machine the step
  count binds first (~1.7 it/s: 3200 steps in ~32 min) and the run is bit-reproducible from the seed;
  on a loaded machine the time budget binds, the schedule still decays to its end, and
  ``training_log.json`` records it (``time_driven_steps`` > 0 or ``stopped_by: "time"``, hence
  ``bit_reproducible: false``) and the steps actually taken.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from fastdiff.checkpoints.fastdiff_format import WEIGHTS_FILE, save_fastdiff
from fastdiff.metrics.data import NUM_CLASSES, load_digits_16
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.schedules import make_alphas_cumprod
from fastdiff.spec import ModelSpec

NULL_CLASS = NUM_CLASSES  # label 10 = "no class" (classifier-free guidance)

UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],   # 16x16, 8x8, 4x4
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=8, attention_head_dim=32, num_class_embeds=NUM_CLASSES + 1,
)

FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}

SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 0, "timestep_spacing": "trailing",
}


def build_model(seed: int) -> tuple[UNet, UNetConfig]:
    torch.manual_seed(seed)
    cfg = UNetConfig.from_diffusers(dict(UNET_CONFIG), "UNet2DModel")
    return UNet(cfg), cfg


def lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% of ``base`` as progress goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def save_model_keeping_siblings(out: str, model: torch.nn.Module, spec: ModelSpec) -> None:
    """save_fastdiff replaces the whole folder (atomically); keep the classifier files that live beside the model."""
    keep = {}
    if os.path.isdir(out):
        for name in os.listdir(out):
            if name.startswith("classifier."):
                with open(os.path.join(out, name), "rb") as f:
                    keep[name] = f.read()
    save_fastdiff(out, model, spec)
    for name, data in keep.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    x_all, y_all = load_digits_16("all")
    model, cfg = build_model(args.seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits UNet: {n_params:,} parameters, {len(x_all)} images, {args.steps} steps of {args.batch}",
          flush=True)

    abar = make_alphas_cumprod("squaredcos_cap_v2", 1000).double()
    sqrt_a, sqrt_1ma = abar.sqrt().float(), (1 - abar).sqrt().float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)

    t0, step, losses, log = time.time(), 0, [], []
    perm, pos = torch.randperm(len(x_all), generator=gen), 0
    stopped_by, time_driven_steps = "steps", 0
    while step < args.steps:
        time_fraction = (time.time() - t0) / (args.minutes * 60)
        if time_fraction >= 1:
            stopped_by = "time"
            print(f"time budget of {args.minutes} min reached at step {step}: stopping", flush=True)
            break
        progress = max(step / args.steps, time_fraction)
        # After warm-up the LR depends on progress: a step where the clock leads makes the run timing-dependent.
        time_driven_steps += step >= args.warmup and time_fraction > step / args.steps
        if pos + args.batch > len(perm):  # a fresh epoch: new permutation, remainder dropped
            perm, pos = torch.randperm(len(x_all), generator=gen), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.p_uncond] = NULL_CLASS
        if args.objective == "flow":
            t = torch.rand(len(y), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            tb = t.view(-1, 1, 1, 1)
            xt, v, t = (1 - tb) * x0 + tb * noise, noise - x0, t * 1000
        else:
            t = torch.randint(0, 1000, (len(y),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a, s = sqrt_a[t].view(-1, 1, 1, 1), sqrt_1ma[t].view(-1, 1, 1, 1)
            xt = a * x0 + s * noise
            v = a * noise - s * x0

        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, args.lr, args.warmup)
        loss = F.mse_loss(model(xt, t, class_labels=y), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA warm-up (as in diffusers' EMAModel): short memory early, args.ema at the end.
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            mean = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            elapsed = time.time() - t0
            log.append({"step": step, "loss": mean, "seconds": round(elapsed, 1)})
            print(f"step {step:6d}  loss {mean:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{elapsed / 60:5.1f} min  {step / elapsed:.2f} it/s", flush=True)

    wall = time.time() - t0
    flow = args.objective == "flow"
    spec = ModelSpec(kind="unet", model_config=cfg.to_dict(),
                     prediction_type="flow_prediction" if flow else "v_prediction",
                     scheduler=dict(FLOW_SCHEDULER if flow else SCHEDULER), in_channels=1, sample_size=16,
                     num_classes=NUM_CLASSES, null_class=NULL_CLASS,
                     source=f"builtin:{'digits_flow' if flow else 'digits'} (trained by fastdiff)",
                     notes=["scikit-learn digits, bilinear 8x8 -> 16x16, [-1, 1]; EMA weights; "
                            "training/train_digits.py"])
    save_model_keeping_siblings(args.out, ema, spec)
    tail = losses[-min(len(losses), 500):]
    info = {
        "objective": args.objective, "seed": args.seed, "steps": step, "planned_steps": args.steps,
        "budget_minutes": args.minutes,
        "stopped_by": stopped_by, "time_driven_steps": time_driven_steps,
        "bit_reproducible": stopped_by == "steps" and time_driven_steps == 0,
        "batch_size": args.batch, "lr": args.lr, "ema_decay": args.ema, "p_uncond": args.p_uncond,
        "threads": args.threads, "wall_time_s": round(wall, 1),
        "final_loss": sum(tail) / max(1, len(tail)), "final_loss_window": len(tail),
        "param_count": n_params, "file_size_bytes": os.path.getsize(os.path.join(args.out, WEIGHTS_FILE)),
        "torch_version": torch.__version__, "command": " ".join(sys.argv), "loss_log": log,
    }
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump(info, f, indent=1)
    # The folder is written through private temp files; these files ship with the package.
    os.chmod(args.out, 0o755)
    for name in os.listdir(args.out):
        os.chmod(os.path.join(args.out, name), 0o644)
    print(f"saved {args.out}: {step} steps in {wall / 60:.1f} min, final loss {info['final_loss']:.4f}, "
          f"{info['file_size_bytes']:,} bytes", flush=True)
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="default: fastdiff/presets/digits (or digits_flow for --objective flow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", choices=("v", "flow"), default="v",
                   help="v: v-prediction on the cosine schedule (builtin:digits); flow: flow matching (digits_flow)")
    p.add_argument("--steps", type=int, default=3200, help="optimizer steps (~1.5 it/s on one shared core: ~35-40 min)")
    p.add_argument("--minutes", type=float, default=50.0,
                   help="time budget: the LR schedule follows max(step, time) progress; stops and saves at the end")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if args.out is None:  # (a flow run must never overwrite builtin:digits)
        args.out = "fastdiff/presets/digits_flow" if args.objective == "flow" else "fastdiff/presets/digits"
    train(args)


if __name__ == "__main__":
    main()
