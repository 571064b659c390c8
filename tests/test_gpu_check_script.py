"""bench/gpu_check.sh, the one GPU script, run on the CPU with tiny models: its stages, summary and the results
it hands the device tool must not rot between the (rare) sessions that have a GPU."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_gpu_check_smoke_run_on_tiny_models(tmp_path):
    pytest.importorskip("diffusers", reason="the script's end-to-end stage compares with diffusers")
    out, device_out = tmp_path / "gpu_out", tmp_path / "OUT"
    device_out.mkdir()
    # an earlier run's Inductor tuning results (bench/inductor_autotune.py): seeded, and brought back again
    seed = tmp_path / "autotune_seed"
    seed.mkdir()
    (seed / "timings.json").write_text(json.dumps({"systemhash": '{"cache": {}}'}))
    (seed / "best_configs.json").write_text(json.dumps({"ab/kernel.best_config": '{"XBLOCK": 64}'}))
    # this checkout's fastdiff (not another one installed), and none of the caller's own FASTDIFF_* settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTDIFF_", "TORCHINDUCTOR_"))}
    env.update(PYTHON=sys.executable, OUT=str(device_out), FASTDIFF_GPU_OUT=str(out),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               FASTDIFF_GPU_STAGES="dit profile", FASTDIFF_GPU_DIT="arch:tiny-dit", FASTDIFF_GPU_SD="arch:tiny-sd-unet",
               FASTDIFF_GPU_DIT_VARIANTS="eager,eager+loop", FASTDIFF_GPU_SKIP_INSTALL="1",
               FASTDIFF_GPU_BUDGET_S="240", TRITON_INTERPRET="0", FASTDIFF_GPU_AUTOTUNE_SEED=str(seed),
               FASTDIFF_GPU_AUTOTUNE_EVERY_S="1")
    proc = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    finally:  # nothing of it outlives the test (the steps' own process groups included)
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stderr[-2000:]
    summary = stdout[stdout.index("fastdiff GPU check summary"):]
    assert "0 step(s) failed or timed out" in summary, summary
    steps = dict(line.split("\t")[:2] for line in (out / "summary.tsv").read_text().splitlines())
    for name in ("dit-xl-2-256", "profile_dit", "profile_sd15", "profile_sd15_sdpa"):
        assert steps[name] == "ok", steps
    report = json.loads((out / "dit-xl-2-256.json").read_text())
    assert report["complete"] is True
    assert [(row["backend"], row["status"]) for row in report["results"]] == [("eager", "ok"), ("eager+loop", "ok")]
    assert [(row["impl"], row["status"]) for row in report["compare"]] == [("diffusers", "ok")]
    assert "tiny-dit eager+loop" in summary  # the end-to-end table, printed last
    # what the device tool brings back: one tarball (without Inductor's compiled kernels) and the summaries
    assert {p.name for p in device_out.iterdir()} >= {"gpu_results.tgz", "summary.tsv", "summary.txt"}
    with tarfile.open(device_out / "gpu_results.tgz") as tar:
        names = tar.getnames()
    assert "gpu_out/dit-xl-2-256.json" in names and "gpu_out/profile_sd15_sdpa.json" in names
    assert not any(n.startswith("gpu_out/inductor/") for n in names)
    # the tuning results in the tarball and, from the watcher, straight in the device tool's folder
    assert {"gpu_out/inductor_autotune/timings.json", "gpu_out/inductor_autotune/best_configs.json"} <= set(names)
    for folder in (out / "inductor_autotune", device_out / "inductor_autotune"):
        bundle = folder / "best_configs.json"
        assert json.loads(bundle.read_text()) == {"ab/kernel.best_config": '{"XBLOCK": 64}'}
    timings = json.loads((device_out / "inductor_autotune" / "timings.json").read_text())
    assert timings == {"systemhash": '{"cache": {}}'}



def test_every_variant_the_script_names_parses():
    """Each stage's default variant list (``${FASTDIFF_GPU_*_VARIANTS:-...}``) is what ``fastdiff bench --backends``
    accepts: a switch renamed or dropped would otherwise surface only on a GPU, as a failed step."""
    import re

    from fastdiff.commands.bench import parse_backend_variants

    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    lists = re.findall(r"\$\{FASTDIFF_GPU_\w+_VARIANTS:-([^}]+)\}", script)
    assert len(lists) >= 6, lists
    labels = [label for text in lists for label, _, _ in parse_backend_variants(text)]
    # run 5's UNet defaults, measured beside run 6's: every switch that takes one back
    assert "triton+loop+cl+sdpa+noresln+noupd" in labels
    assert "--compile-mode reduce-overhead" in script
