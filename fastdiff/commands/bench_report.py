"""``fastdiff bench``'s output: per-row figures, ratios against diffusers, the table, the plot and the JSON report,
and the checks that a run's output paths are writable before it starts."""

from __future__ import annotations

import time


def _one_line(e) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _check_output(flag: str, path, extensions) -> None:
    """A --json / --plot target, checked before any run: a finished run must never fail on its output."""
    from ..errors import BadArgumentError
    from ..utils.atomic import check_file_path

    if not path:
        return
    try:
        check_file_path(path)
    except BadArgumentError as e:
        raise BadArgumentError(f"{flag}: {e}") from None
    if extensions and not path.lower().endswith(tuple(extensions)):
        raise BadArgumentError(f"{flag}: expected a file name ending in one of {sorted(extensions)}, found {path!r}")


def _plot_extensions() -> tuple:
    """The image formats matplotlib writes; --plot needs matplotlib (BadArgumentError, one line, when missing)."""
    from ..errors import BadArgumentError

    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as e:
        raise BadArgumentError("--plot needs matplotlib (pip install matplotlib)") from e
    return tuple("." + ext for ext in Figure().canvas.get_supported_filetypes())


def _save_figure(fig, path: str) -> None:
    """The figure written atomically, in the format its extension names."""
    import os

    from ..utils.atomic import atomic_path

    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
        fig.savefig(tmp, dpi=120)


def _write_json(path: str, obj) -> None:
    import json

    from ..utils.atomic import atomic_path

    with atomic_path(path, suffix=".json") as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def _row_line(row: dict) -> str:
    """The row's figures as soon as they exist: a run killed by its time limit keeps them in its log."""
    return (f"    median {row['median_s'] * 1e3:.1f} ms, p90 {row['p90_s'] * 1e3:.1f} ms, "
            f"first call {row['first_call_s']:.1f} s")


def _row_stats(m, b: int, steps: int, nfe: int) -> dict:
    s = m.stats()
    s["nfe"] = nfe
    s["per_step_s"] = s["median_s"] / steps
    # host time spent issuing one step's work (CPU launch overhead; on the CPU it is the whole step)
    s["host_per_step_s"] = s["host_median_s"] / steps if s.get("host_median_s") is not None else None
    s["per_nfe_s"] = s["median_s"] / max(nfe, 1)
    s["images_per_s"] = b / s["median_s"] if s["median_s"] > 0 else float("inf")
    return s


def _ms(s):
    return "-" if s is None else f"{s * 1e3:.1f}"


def _us(s):
    return "-" if s is None else f"{s * 1e6:.0f}"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def _ratios(results, compare_rows) -> list[dict]:
    """fastdiff's median over diffusers' for each row and batch; per network evaluation where the two ran different
    counts (a sampler diffusers has no scheduler for: it runs DPM-Solver++), marked ``per_nfe``."""
    ref = {(r["impl"], r["batch"]): r for r in compare_rows if r.get("status") == "ok"}
    out = []
    for r in results:
        if r.get("status") != "ok":
            continue
        for impl in ("diffusers", "diffusers+compile"):
            d = ref.get((impl, r["batch"]))
            if d and d["median_s"]:
                per_nfe = bool(r.get("nfe") and d.get("nfe") and r["nfe"] != d["nfe"])
                ratio = r["per_nfe_s"] / d["per_nfe_s"] if per_nfe else r["median_s"] / d["median_s"]
                out.append({"backend": r["backend"], "batch": r["batch"], "vs": impl, "ratio": ratio,
                            "per_nfe": per_nfe})
    return out


def format_table(results, compare_rows, ratios) -> str:
    head = ("backend", "batch", "median ms", "p90 ms", "p99 ms", "ms/step", "host us/step", "img/s", "peak MiB",
            "1st-call +s", "optimize s", "/diffusers", "/diff+compile")
    lines = []
    rat = {(x["backend"], x["batch"], x["vs"]): x for x in ratios}
    for r in list(results) + list(compare_rows):
        name = r.get("backend") or r.get("impl")
        if r.get("status") != "ok":
            lines.append((name, str(r["batch"]), f"{r['status']}: {r.get('reason', '')}"))
            continue
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        r_ = lambda x: "-" if x is None else f"{x['ratio']:.2f}" + ("/nfe" if x.get("per_nfe") else "")  # noqa: E731
        lines.append((name, str(r["batch"]), _ms(r["median_s"]), _ms(r["p90_s"]), _ms(r["p99_s"]),
                      _ms(r["per_step_s"]), _us(r.get("host_per_step_s")), f"{r['images_per_s']:.2f}",
                      _mib(r.get("peak_memory_bytes")),
                      f"{r['warmup_overhead_s']:.2f}", f(r.get("optimize_s")),
                      r_(rat.get((name, r["batch"], "diffusers"))), r_(rat.get((name, r["batch"], "diffusers+compile")))))
    widths = [max([len(head[i])] + [len(l[i]) for l in lines if len(l) == len(head)]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(widths[i]) if i > 1 or True else c for i, c in enumerate(row))  # noqa: E731
    out = [fmt(head), "  ".join("-" * w for w in widths)]
    for l in lines:
        out.append(fmt(l) if len(l) == len(head) else f"{l[0].rjust(widths[0])}  {l[1].rjust(widths[1])}  {l[2]}")
    return "\n".join(out)


def _plot(path, results, compare_rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for r in list(results) + list(compare_rows):
        if r.get("status") == "ok":
            series.setdefault(r.get("backend") or r.get("impl"), []).append((r["batch"], r["median_s"] * 1e3))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                linestyle="--" if name.startswith("diffusers") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("median latency per generate call (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _json_report(args, variants, batches, compare, spec, n_params, dev_name, device, results, compare_rows,
                 ratios, complete) -> dict:
    import torch

    from ..runtime.timing import memory_method
    from .info import collect

    return {
        "schema": "fastdiff-bench/1",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": complete,  # false: written after a row, more were to come
        "device": dev_name,
        "versions": collect(),
        "settings": {"model": args.model, "backends": [v[0] for v in variants], "batch": batches, "steps": args.steps,
                     "sampler": args.sampler, "schedule": args.schedule, "cfg": args.cfg, "dtype": args.dtype,
                     "warmup": args.warmup, "repeat": args.repeat, "compare": compare, "seed": args.seed,
                     "compile_mode": (args.compile_mode or ("max-autotune" if device.type == "cuda" else "default"))
                     if "compile" in compare else None,
                     "threads": torch.get_num_threads(),
                     "timing": "cuda events" if device.type == "cuda" else "perf_counter",
                     "memory": memory_method(device),
                     "measured": "one pipe.generate call (noise + sampling loop + CFG, no decode)"},
        "model": {"kind": spec.kind, "params": n_params, "in_channels": spec.in_channels,
                  "sample_size": list(spec.sample_size), "source": spec.source},
        "results": results,
        "compare": compare_rows,
        "ratios": ratios,
    }
