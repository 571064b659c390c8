"""Load time and peak memory: fastdiff.load vs diffusers' from_pretrained on the same folder.

An SD1.5-sized UNet2DConditionModel with random weights is saved once (safetensors) to a temporary
folder; each loader then runs in its own fresh process (so peak RSS is its own), ``--repeat`` times,
alternating. Reported: median wall time of the load call and peak RSS growth over the process baseline.

    python bench/bench_load.py [--arch sd15] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
import torch
which, folder = sys.argv[1], sys.argv[2]
if which == "diffusers":
    import diffusers  # imported before the clock starts, like fastdiff below
else:
    import fastdiff, fastdiff.checkpoints, fastdiff.models.unet
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
def hwm_mb():  # VmHWM: peak resident set so far (max of the high-water mark and the current RSS)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
base_rss = rss_mb()
base = hwm_mb()
t = time.perf_counter()
if which == "diffusers":
    m = diffusers.UNet2DConditionModel.from_pretrained(folder)
else:
    m = fastdiff.load(folder).model
dt = time.perf_counter() - t
with torch.no_grad():  # touch every weight: lazily mapped pages are read in here, not hidden
    total = sum(float(p.float().sum()) for p in m.parameters())
dt_touch = time.perf_counter() - t
n = sum(p.numel() for p in m.parameters())
peak = hwm_mb()
# peak RSS growth over the post-import baseline, and the resident size after every weight was read
print(json.dumps({"seconds": dt, "seconds_touched": dt_touch, "peak_rss_mb": max(peak - base, 0), "rss_after_mb": rss_mb() - base_rss,
                  "params": n}))
"""


# diffusers config.json values of the released UNets (runwayml SD1.5, stabilityai SD2.1)
ARCHS = {
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True),
}


def make_folder(arch: str) -> str:
    import diffusers
    import torch

    folder = tempfile.mkdtemp(prefix=f"fastdiff-load-{arch}-")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**ARCHS[arch]).save_pretrained(folder)
    return folder


def run(which: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, folder], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sd21"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    folder = make_folder(args.arch)
    try:  # the folder is the model's whole size (3.3 GB for SD1.5): never leave it in the temp dir
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
        runs = {"fastdiff": [], "diffusers": []}
        for _ in range(args.repeat):
            for which in ("diffusers", "fastdiff"):
                runs[which].append(run(which, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.arch} UNet, {runs['fastdiff'][0]['params'] / 1e6:.0f}M params, {size:.0f} MiB safetensors, "
          f"{args.repeat} fresh processes each")
    keys = ("seconds", "seconds_touched", "peak_rss_mb", "rss_after_mb")
    print(f"{'loader':10s} {'load s':>8s} {'load+read all s':>16s} {'peak RSS growth MiB':>20s} {'RSS MiB':>8s}")
    med = {}
    for which, rs in runs.items():
        med[which] = [statistics.median(r[k] for r in rs) for k in keys]
        print(f"{which:10s} {med[which][0]:8.2f} {med[which][1]:16.2f} {med[which][2]:20.0f} {med[which][3]:8.0f}")
    f, d = med["fastdiff"], med["diffusers"]
    ratio = [a / b if b else float("nan") for a, b in zip(f, d)]
    print(f"ratio fastdiff/diffusers: load {ratio[0]:.2f}, load+read {ratio[1]:.2f}, peak RSS growth {ratio[2]:.2f}, "
          f"RSS after reading {ratio[3]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
