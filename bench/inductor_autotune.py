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

Only these come back, not the compiled kernels (tens of MB). The device tool returns at most 8 files, so each kind
travels as one bundle whatever the number of software stacks and kernels: ``timings.json`` (file name -> text)
and ``best_configs.json`` (relative path -> text). Every file is written to a temporary name and renamed, so a
call cut off mid-copy leaves no torn JSON behind; Inductor's own temporary files (dot-names, renamed a moment
later) and files that vanish or are half written while read are skipped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TIMINGS = "timings.json"
BUNDLE = "best_configs.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_files(paths, root: Path) -> dict:
    """{path relative to root: text} of the complete JSON files among ``paths`` (no dot-names)."""
    out = {}
    for f in sorted(paths):
        if f.name.startswith("."):
            continue
        try:
            text = f.read_text()
            json.loads(text)
        except (OSError, ValueError):  # renamed away, or being written, this moment
            continue
        out[f.relative_to(root).as_posix()] = text
    return out


def save(cache_dir: Path, dest: Path) -> dict:
    """Bundle the choice timings and the kernels' chosen configs of ``cache_dir`` into ``dest`` (two files).
    Returns {"timings": timing files bundled, "best_configs": kernels bundled}."""
    dest.mkdir(parents=True, exist_ok=True)
    timings = {Path(k).name: v for k, v in _json_files((cache_dir / "cache").glob("*"), cache_dir / "cache").items()}
    configs = _json_files(cache_dir.glob("*/*.best_config"), cache_dir)
    for name, bundle in ((TIMINGS, timings), (BUNDLE, configs)):
        if bundle:
            _write_atomic(dest / name, json.dumps(bundle, indent=0, sort_keys=True).encode())
    return {"timings": len(timings), "best_configs": len(configs)}


def seed(src: Path, cache_dir: Path) -> dict:
    """Put what ``save`` wrote into ``src`` into a cache folder, keeping whatever the cache already holds.
    Returns {"timings": files seeded, "best_configs": kernels seeded}."""
    (cache_dir / "cache").mkdir(parents=True, exist_ok=True)
    timings = configs = 0
    if not src.is_dir():
        return {"timings": 0, "best_configs": 0}
    timing_path = src / TIMINGS
    if timing_path.is_file():
        for name, text in json.loads(timing_path.read_text()).items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"{timing_path}: {name!r} is not a file name of Inductor's timing cache")
            target = cache_dir / "cache" / name
            if not target.exists():
                target.write_text(text)
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
