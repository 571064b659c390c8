"""Inductor's tuning results, carried from one GPU run to the next (``bench/gpu_check.sh``).

    python bench/inductor_autotune.py save CACHE_DIR DEST_DIR   # what CACHE_DIR has learnt -> DEST_DIR
    python bench/inductor_autotune.py seed SRC_DIR CACHE_DIR    # a saved DEST_DIR -> a fresh CACHE_DIR

torch.compile(mode="max-autotune") of the diffusers SD1.5 UNet outlived a 354 s step in run 4: Inductor timed
18 GEMM / convolution problems, 5-42 s each (each problem's 13-22 Triton choices compiled and run), and the UNet
has several times that many. A device call lasts at most 10 minutes, so the comparison can only finish across
runs, each starting where the last one stopped. Two kinds of results make that possible, both keyed by what
they were measured for (the device, the software stack, the problem's shapes or the kernel's source hash), so a
result that does not apply is never used:

- ``CACHE_DIR/cache/<system hash>``: one JSON per device and software stack, the timing of every GEMM /
  convolution choice (``torch._inductor.codecache.PersistentCache``). With every choice of a problem found
  there, Inductor neither compiles nor runs that problem's choices.
- ``CACHE_DIR/<xx>/<key>.best_config``: one small JSON per generated Triton kernel, the launch configuration
  its autotuning (and, under max-autotune, coordinate-descent tuning) chose (``LocalAutotuneCache``).

Only these come back, not the compiled kernels (tens of MB). The device tool returns at most 8 files, so the
``.best_config`` files travel as one bundle, ``best_configs.json`` (relative path -> file text). Every file is
written to a temporary name and renamed, so a call cut off mid-copy leaves no torn JSON behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

BUNDLE = "best_configs.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(cache_dir: Path, dest: Path) -> dict:
    """Copy the choice timings and bundle the kernels' chosen configs of ``cache_dir`` into ``dest``.
    Returns {"timings": files copied, "best_configs": kernels bundled}."""
    dest.mkdir(parents=True, exist_ok=True)
    timings = 0
    for f in sorted((cache_dir / "cache").glob("*")):
        if f.is_file():
            _write_atomic(dest / f.name, f.read_bytes())
            timings += 1
    bundle = {}
    for f in sorted(cache_dir.glob("*/*.best_config")):
        try:
            text = f.read_text()
            json.loads(text)  # one Inductor is writing this moment (it renames too, but be sure)
        except (OSError, ValueError):
            continue
        bundle[f.relative_to(cache_dir).as_posix()] = text
    if bundle:
        _write_atomic(dest / BUNDLE, json.dumps(bundle, indent=0, sort_keys=True).encode())
    return {"timings": timings, "best_configs": len(bundle)}


def seed(src: Path, cache_dir: Path) -> dict:
    """Put what ``save`` wrote into ``src`` into a cache folder, keeping whatever the cache already holds.
    Returns {"timings": files seeded, "best_configs": kernels seeded}."""
    (cache_dir / "cache").mkdir(parents=True, exist_ok=True)
    timings = configs = 0
    if not src.is_dir():
        return {"timings": 0, "best_configs": 0}
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name == BUNDLE or f.name.startswith(".") or f.suffix == ".md":
            continue
        target = cache_dir / "cache" / f.name
        if not target.exists():
            shutil.copyfile(f, target)
            timings += 1
    bundle_path = src / BUNDLE
    if bundle_path.is_file():
        for rel, text in json.loads(bundle_path.read_text()).items():
            target = (cache_dir / rel).resolve()
            # a bundle names files inside the cache folder, two levels down, and nothing else
            if target.suffix != ".best_config" or target.parent.parent != cache_dir.resolve():
                raise ValueError(f"{bundle_path}: {rel!r} is not <dir>/<key>.best_config inside the cache folder")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
                configs += 1
    return {"timings": timings, "best_configs": configs}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("save", "seed"):
        print("\n".join(__doc__.split("\n\n")[:2]), file=sys.stderr)
        return 2
    command, a, b = argv[0], Path(argv[1]), Path(argv[2])
    counts = save(a, b) if command == "save" else seed(a, b)
    print(f"inductor autotune {command}: {counts['timings']} timing file(s), {counts['best_configs']} kernel config(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
