"""The command line as users run it: `fastdiff generate`, `fastdiff bench`, help and bad arguments (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1", OMP_NUM_THREADS="1")


def fastdiff(*args, cwd, timeout=120):
    # run from a temp folder: the repo root holds a `kernels/` folder that shadows a pip package name
    return subprocess.run([sys.executable, "-m", "fastdiff.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_generate_grid_png(tmp_path):
    from PIL import Image

    r = fastdiff("generate", "arch:tiny-unet", "--steps", "2", "--n", "4", "-o", "out.png", "--no-progress",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    im = Image.open(tmp_path / "out.png")
    im.verify()
    # tiny-unet samples are 16x16; 4 images -> a 2x2 grid with 2 px padding
    assert Image.open(tmp_path / "out.png").size == (2 * 18 + 2, 2 * 18 + 2)
    last = r.stdout.strip().splitlines()[-1]
    for part in ("load", "optimise", "sample", "decode"):
        assert part in last


def test_generate_with_tuned_kernels(tmp_path):
    """--kernel-ops tune on the CPU (interpreter): nothing can be measured, every layer runs its fallback."""
    r = fastdiff("generate", "arch:tiny-unet", "--steps", "1", "--n", "1", "-o", "out.png", "--no-progress",
                 "--backend", "triton", "--kernel-ops", "tune", "--tune-cache", "tune.json", cwd=tmp_path,
                 timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.png").exists()


def test_generate_separate(tmp_path):
    from PIL import Image

    r = fastdiff("generate", "arch:tiny-unet", "--steps", "1", "--n", "3", "--separate", "-o", "img.png",
                 "--height", "8", "--width", "16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in tmp_path.glob("img_*.png"))
    assert files == ["img_0.png", "img_1.png", "img_2.png"]
    assert Image.open(tmp_path / "img_0.png").size == (16, 8)


def test_generate_latent_model_needs_output_latents(tmp_path):
    r = fastdiff("generate", "arch:tiny-dit", "--steps", "1", "--n", "2", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--output-latents" in r.stderr and "VAE" in r.stderr
    r = fastdiff("generate", "arch:tiny-dit", "--steps", "1", "--n", "2", "--class", "3", "--cfg", "2",
                 "--output-latents", "lat.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    assert tuple(load_file(str(tmp_path / "lat.safetensors"))["latents"].shape) == (2, 4, 8, 8)


def test_latents_file_names_in_any_case(tmp_path):
    """-o takes X.PNG; --output-latents and --image take X.SAFETENSORS alike (written, then read back as latents,
    not handed to Pillow)."""
    r = fastdiff("generate", "arch:tiny-unet", "--steps", "1", "--n", "1", "-o", "A.PNG", "--output-latents",
                 "L.SAFETENSORS", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "L.SAFETENSORS").is_file() and (tmp_path / "A.PNG").is_file()
    r = fastdiff("generate", "arch:tiny-unet", "--steps", "2", "--n", "1", "--image", "L.SAFETENSORS",
                 "--strength", "0.5", "-o", "b.png", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_bench_backend_variants_and_host_time(tmp_path):
    """'+'-switches become OptimizeConfig fields; each row reports the host time per step."""
    r = fastdiff("bench", "arch:tiny-unet", "--backends", "eager,eager+loop+cl", "--steps", "2", "--repeat", "2",
                 "--warmup", "1", "--json", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "out.json").read_text())
    rows = {x["backend"]: x for x in d["results"]}
    assert set(rows) == {"eager", "eager+loop+cl"} and d["settings"]["backends"] == ["eager", "eager+loop+cl"]
    assert any("cuda_graphs ignored" in n for n in rows["eager+loop+cl"]["notes"])  # no GPU: a note, no error
    for row in rows.values():
        assert row["status"] == "ok"
        # on the CPU the host time is the whole call, so per step it is the per-step latency
        assert row["host_median_s"] == pytest.approx(row["median_s"])
        assert row["host_per_step_s"] == pytest.approx(row["per_step_s"])
    assert "host us/step" in r.stdout


def test_bench_frees_each_variant_before_the_next_is_measured(tmp_path, monkeypatch):
    """A variant's pipeline (weights, graph pools) is gone when the next variant loads, so a row's peak memory is
    its own: in run 5 an SD1.5 row after two others read 3485 MiB, 1754 alone."""
    import gc
    import weakref

    import fastdiff as fd
    from fastdiff.cli import main

    made, alive_at_load = [], []
    real_load = fd.load

    def load(*a, **k):
        alive_at_load.append(sum(ref() is not None for ref in made))
        pipe = real_load(*a, **k)
        made.append(weakref.ref(pipe))
        return pipe

    monkeypatch.setattr(fd, "load", load)
    gc.disable()  # only the bench's own collection may free a cycle
    try:
        rc = main(["bench", "arch:tiny-unet", "--backends", "eager,eager+loop,eager+step", "--steps", "1",
                   "--repeat", "1", "--warmup", "1", "--json", str(tmp_path / "out.json")])
    finally:
        gc.enable()
    assert rc == 0 and len(made) >= 3  # one per variant (and the report's parameter count)
    assert alive_at_load == [0] * len(made)  # without the bench's collection: [0, 0, 1, 1]


def test_bench_json_keeps_the_rows_of_a_run_cut_off(tmp_path, monkeypatch):
    """The JSON report is rewritten after every measured row, so a bench killed by a time limit (a torch.compile
    that outlives its step) keeps what it measured, marked incomplete."""
    from fastdiff.cli import main
    from fastdiff.commands import bench

    def diffusers_then_killed(args, source, compare, batches, device, log, on_row=None):
        on_row(dict(impl="diffusers", batch=1, status="ok", median_s=0.5, p90_s=0.5, per_step_s=0.25))
        raise KeyboardInterrupt  # the compile row never comes

    monkeypatch.setattr(bench, "_bench_diffusers", diffusers_then_killed)
    out = tmp_path / "cut.json"
    rc = main(["bench", "arch:tiny-dit", "--backends", "eager", "--steps", "1", "--repeat", "1", "--warmup", "1",
               "--compare", "diffusers,compile", "--json", str(out)])
    assert rc == 130  # interrupted
    d = json.loads(out.read_text())
    assert d["complete"] is False and [r["backend"] for r in d["results"]] == ["eager"]
    assert [r["impl"] for r in d["compare"]] == ["diffusers"] and d["ratios"]
    assert not (tmp_path / "cut.json.tmp").exists()


def test_bench_json_keeps_a_fastdiff_row_of_a_run_cut_off(tmp_path, monkeypatch):
    """The first fastdiff row is in the JSON before the second batch is measured."""
    from fastdiff.cli import main
    from fastdiff.runtime import timing

    real, calls = timing.measure, []

    def measure_then_killed(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(timing, "measure", measure_then_killed)
    out = tmp_path / "cut.json"
    assert main(["bench", "arch:tiny-dit", "--backends", "eager", "--batch", "1,2", "--steps", "1", "--repeat", "1",
                 "--warmup", "1", "--json", str(out)]) == 130
    d = json.loads(out.read_text())
    assert d["complete"] is False and [(r["backend"], r["batch"], r["status"]) for r in d["results"]] == [
        ("eager", 1, "ok")]


def test_parse_backend_variants():
    from fastdiff.commands.bench import parse_backend_variants
    from fastdiff.errors import BadArgumentError

    assert parse_backend_variants("triton+loop+qkv, compile+step") == [
        ("triton+loop+qkv", "triton", dict(cuda_graphs=True, graph_scope="loop", fuse_qkv=True)),
        ("compile+step", "compile", dict(cuda_graphs=True, graph_scope="step"))]
    # per-op kernel choices combine; two choices for one op, or a table with per-op choices, do not
    assert parse_backend_variants("compile+loop+autotune")[0][2] == dict(
        cuda_graphs=True, graph_scope="loop", compile_mode="max-autotune")
    assert parse_backend_variants("triton+gnext+upd")[0][2] == dict(
        kernel_ops={"group_norm": "cuda_ext", "sampler_update": "triton"})
    # the switches run 5's plan names: the biases kept in their own kernels, the attention on Triton's pointer kernel
    assert parse_backend_variants("triton+loop+cl+noconvbias+tattn")[0][2] == dict(
        cuda_graphs=True, graph_scope="loop", channels_last=True, fuse_conv_bias=False,
        kernel_ops={"attention": "triton"})
    for bad, match in (("triton+upd+updext", "same op"), ("triton+allk+upd", "choose one of"),
                       ("triton+loop+step", "choose one of"), ("triton+loop+autotune", "needs backend='compile'"),
                       ("compile+autotune+autotune", "appears twice")):
        with pytest.raises(BadArgumentError, match=match):
            parse_backend_variants(bad)


def test_bench_json(tmp_path):
    r = fastdiff("bench", "arch:tiny-unet", "--backends", "eager,tensorrt", "--batch", "1,2", "--steps", "2",
                 "--repeat", "2", "--warmup", "1", "--json", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "eager" in r.stdout and "skipped" in r.stdout
    d = json.loads((tmp_path / "out.json").read_text())
    for key in ("device", "versions", "settings", "model", "results"):
        assert key in d
    assert d["versions"]["versions"]["torch"]
    assert d["settings"]["steps"] == 2 and d["settings"]["batch"] == [1, 2]
    rows = {(x["backend"], x["batch"]): x for x in d["results"]}
    assert set(rows) == {("eager", 1), ("eager", 2), ("tensorrt", 1), ("tensorrt", 2)}
    for b in (1, 2):
        ok = rows[("eager", b)]
        assert ok["status"] == "ok"
        for k in ("median_s", "p90_s", "p99_s", "images_per_s", "per_step_s", "first_call_s", "nfe"):
            assert ok[k] is not None and ok[k] >= 0
        assert set(ok["kernels"].values()) == {"native"}  # the path each fused op took
        assert ok["p99_s"] >= ok["p90_s"] >= ok["median_s"] > 0
        assert len(ok["times_s"]) == 2 and ok["nfe"] >= 2
        skipped = rows[("tensorrt", b)]
        assert skipped["status"] == "skipped" and "tensorrt" in skipped["reason"]


@pytest.mark.parametrize("args, needle", [
    (["generate", "arch:tiny-unet", "--sampler", "nope"], "--sampler"),
    (["generate", "arch:tiny-unet", "--steps", "0"], "--steps"),
    (["generate", "/no/such/model/here"], "/no/such/model/here"),
    (["generate", "arch:tiny-unet", "--backend", "tensorrt"], "tensorrt"),
    (["generate", "arch:tiny-unet", "--kernel-ops", "tune"], "--kernel-ops"),
    (["generate", "arch:tiny-unet", "--backend", "triton", "--tune-cache", "t.json"], "--tune-cache"),
    (["generate", "arch:no-such-arch"], "no-such-arch"),
    (["bench", "arch:tiny-unet", "--backends", "eager,warp"], "warp"),
    (["bench", "arch:tiny-unet", "--backends", "eager+turbo"], "turbo"),
    (["bench", "arch:tiny-unet", "--backends", "eager+step+loop"], "+loop"),
    (["bench", "arch:tiny-unet", "--batch", "0"], "--batch"),
    (["bench", "arch:tiny-unet", "--steps", "0"], "--steps"),
])
def test_bad_arguments_exit_2_one_line(tmp_path, args, needle):
    r = fastdiff(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("fastdiff")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "error" in lines[0]


def test_bare_command_is_a_usage_error_on_stderr(tmp_path):
    r = fastdiff(cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert "generate" in r.stderr and "usage" in r.stderr


def test_help_explains_options(tmp_path):
    r = fastdiff("--help", cwd=tmp_path)
    assert r.returncode == 0
    for cmd in ("generate", "bench", "info"):
        assert cmd in r.stdout
    r = fastdiff("bench", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for opt in ("--backends", "--batch", "--steps", "--sampler", "--cfg", "--dtype", "--warmup", "--repeat",
                "--compare", "--json", "--plot", "--device"):
        assert opt in r.stdout
    r = fastdiff("generate", "--help", cwd=tmp_path)
    for opt in ("--sampler", "--steps", "--schedule", "--cfg", "--class", "--n", "--seed", "--height", "--width",
                "--backend", "--dtype", "--separate", "--output-latents"):
        assert opt in r.stdout


@pytest.mark.parametrize("extra,needle", [
    (["-o", "/proc/x.png"], "cannot write"),
    (["--seed", "99999999999999999999"], "--seed"),
    (["--device", "meta"], "--device"),
    (["--output-latents", "/nonexistent/x.safetensors"], "--output-latents"),
])
def test_generate_output_and_argument_errors_exit_2(tmp_path, extra, needle):
    import subprocess
    import sys as _sys

    cmd = [_sys.executable, "-m", "fastdiff.cli", "generate", "arch:tiny-unet", "--steps", "1", "--n", "1",
           "--no-progress", "-o", str(tmp_path / "o.png")] + extra
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_info_shows_each_fused_layers_path_for_a_model(tmp_path):
    """`fastdiff info MODEL --backend triton` (the interpreter stands in for a GPU; off CUDA the measured per-op
    table is empty, so every op is on Triton, as optimize() would put it): each fused layer's path; the per-op
    table lists the samplers' state update too; without the extension, the reason it is not built."""
    r = fastdiff("info", "arch:tiny-sd-unet", "--backend", "triton", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model_ops"]["backend"] == "triton"
    assert report["model_ops"]["ops"] == {"GroupNorm": "triton", "LayerNorm": "triton", "Attention": "triton",
                                          "GEGLU": "triton"}
    assert "sampler_update" in report["fused_ops"]
    assert report["cuda_extension"].startswith("not built") and ": " in report["cuda_extension"]
    eager = fastdiff("info", "arch:tiny-dit", "--backend", "eager", cwd=tmp_path)
    assert eager.returncode == 0 and "ModulatedLayerNorm   native" in eager.stdout
    default = fastdiff("info", "arch:tiny-dit", "--json", cwd=tmp_path)  # the interpreter: triton can run
    assert json.loads(default.stdout)["model_ops"]["backend"] == "triton"
    no_interpreter = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}  # no GPU either: one line, status 2
    r = subprocess.run([sys.executable, "-m", "fastdiff.cli", "info", "arch:tiny-dit", "--backend", "triton"],
                       cwd=tmp_path, env=no_interpreter, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "backend 'triton' was requested" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastdiff.cli", "info", "arch:tiny-dit", "--json"],  # default: eager
                       cwd=tmp_path, env=no_interpreter, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["model_ops"]["backend"] == "native"


def test_info_model_ops_follow_optimize_on_a_gpu(monkeypatch):
    """On CUDA `fastdiff info MODEL` reports what optimize(backend="triton") runs: the measured per-op table (a
    UNet's attention on the Triton pointer kernel since run 6, a DiT's on the TMA kernel), unless --kernel-ops all."""
    import torch

    import fastdiff
    from fastdiff.commands import info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("fastdiff.commands.generate.load_pipeline",
                        lambda model, device: fastdiff.load(model))  # the weights stay on the CPU
    measured = info.model_ops("arch:tiny-sd-unet", "triton")
    assert measured["device"] == "cuda" and measured["ops"]["Attention"] == "triton"
    assert measured["ops"]["GroupNorm"] == "triton" and measured["ops"]["LayerNorm"] == "triton"
    assert info.model_ops("arch:tiny-dit", "triton")["ops"]["Attention"] == "triton_tma"
    assert info.model_ops("arch:tiny-dit", "triton", "all")["ops"]["Attention"] == "triton"


def test_info_names_the_cuda_and_cudnn_torch_was_built_with():
    """cudnn_benchmark's figures are read against these; cuDNN 9 and 8 encode their version numbers differently."""
    import torch

    from fastdiff.commands.info import _cudnn_version, collect

    versions = collect()["versions"]
    assert versions["cuda"] == (torch.version.cuda or "none (CPU build of torch)")
    assert versions["cudnn"] == ("not available" if not torch.backends.cudnn.is_available() else
                                 _cudnn_version(torch.backends.cudnn.version()))
    assert (_cudnn_version(91900), _cudnn_version(90100), _cudnn_version(8902)) == ("9.19.0", "9.1.0", "8.9.2")


def test_info_lists_samplers_and_the_scheduler_configs_followed():
    """What `generate --sampler` takes and which diffusers scheduler_config.json classes are reproduced."""
    from fastdiff.commands.info import collect
    from fastdiff.sampling import SAMPLERS
    from fastdiff.scheduler_config import plan_from_scheduler_config

    report = collect()
    assert report["samplers"] == sorted(SAMPLERS) and "tcd" in report["samplers"]
    assert {"PNDMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler"} <= set(report["diffusers_schedulers"])
    for cls in report["diffusers_schedulers"]:  # each listed class really has a plan
        assert plan_from_scheduler_config({"_class_name": cls}, 4).steps >= 4


def test_info_says_how_a_model_samples():
    """`fastdiff info MODEL` names the prediction type, the scheduler and what generate() runs by default (for a
    flow model also the frame)."""
    from fastdiff.checkpoints.presets import builtin_names
    from fastdiff.commands import info

    sampling = info.model_ops("arch:tiny-dit", "eager")["sampling"]
    assert sampling == {"prediction_type": "epsilon", "scheduler": "DDIMScheduler", "default_sampler": "ddim",
                        "denoiser": "discrete"}
    if "digits_flow" in builtin_names():
        flow = info.model_ops("builtin:digits_flow", "eager")["sampling"]
        assert flow == {"prediction_type": "flow_prediction", "scheduler": "FlowMatchEulerDiscreteScheduler",
                        "default_sampler": "euler", "denoiser": "flow", "frame": "t"}


def test_generate_a_sit_checkpoint_and_a_scheduler_file(tmp_path):
    """`--scheduler sit` loads an official-DiT file as a SiT flow model (as load(scheduler=SIT_SCHEDULER) does),
    `--scheduler FILE` any diffusers scheduler config; the CLI's latents equal the Python API's."""
    import torch
    from safetensors.torch import load_file

    from conftest import fixture_path
    from fastdiff.checkpoints.presets import SIT_SCHEDULER

    ckpt = fixture_path("dit", "dit_tiny.pt")
    r = fastdiff("generate", ckpt, "--num-heads", "4", "--scheduler", "sit", "--steps", "3", "--n", "2", "--class",
                 "3", "--cfg", "2", "--no-progress", "--output-latents", "sit.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from fastdiff.checkpoints import load

    want = load(ckpt, num_heads=4, scheduler=SIT_SCHEDULER).generate(
        seeds=[0, 1], class_labels=[3, 3], cfg_scale=2.0, steps=3, progress=False)
    torch.testing.assert_close(load_file(str(tmp_path / "sit.safetensors"))["latents"], want, rtol=0, atol=1e-5)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                                "shift": 3.0}))
    r = fastdiff("info", ckpt, "--num-heads", "4", "--scheduler", "scheduler_config.json", cwd=tmp_path)
    assert r.returncode == 0 and "predicts flow_prediction" in r.stdout, r.stderr
    r = fastdiff("generate", ckpt, "--num-heads", "4", "--scheduler", "missing.json", "--output-latents", "x.safetensors",
                 cwd=tmp_path)
    assert r.returncode == 2 and "scheduler_config.json" in r.stderr and "Traceback" not in r.stderr


def test_generate_checks_every_output_before_sampling(tmp_path):
    """A folder in the way of the third --separate PNG fails the run before any file is written (no partial
    output), with one line; and the seed range ends at 2**63 - n inclusive."""
    (tmp_path / "gs_2.png").mkdir()
    r = fastdiff("generate", "arch:tiny-unet", "--steps", "1", "--n", "4", "--separate", "-o", "gs.png",
                 "--output-latents", "gs.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "gs_2.png: expected a file path, found a folder" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gs_2.png"]
    r = fastdiff("generate", "arch:tiny-unet", "--steps", "1", "--n", "2", "--seed", str(2**63 - 2), "--no-progress",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = fastdiff("generate", "arch:tiny-unet", "--steps", "1", "--n", "2", "--seed", str(2**63 - 1), cwd=tmp_path)
    assert r.returncode == 2 and "--seed" in r.stderr


def test_generate_refuses_what_it_would_silently_skip(tmp_path):
    """--cfg on a class model with no --class (both passes unconditional), -o on a latent model without a VAE (no
    PNG can be written), a non-finite --cfg: each one line, exit 2."""
    for argv, match in ((["builtin:digits", "--cfg", "3"], "needs --class"),
                        (["arch:tiny-dit", "--class", "1", "-o", "x.png", "--output-latents", "x.safetensors"],
                         "-o / --separate ask for PNGs, but this is a latent model"),
                        (["builtin:digits", "--class", "1", "--cfg", "nan"], "--cfg: expected a finite number")):
        r = fastdiff("generate", *argv, "--steps", "1", "--no-progress", cwd=tmp_path)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_generate_makes_one_image_per_label_and_keeps_load_errors(tmp_path):
    """Several --class labels and no --n: one image each (diffusers' DiTPipeline); a load option that does not apply
    to the default model is reported as such, not as a missing model."""
    r = fastdiff("generate", "arch:tiny-dit", "--class", "1", "2", "3", "--cfg", "2", "--steps", "1",
                 "--output-latents", "l.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "l.safetensors"))["latents"].shape[0] == 3
    r = fastdiff("generate", "builtin:digits", "--head-channels", "8", "--steps", "1", cwd=tmp_path)
    assert r.returncode == 2 and "not shipped" not in r.stderr and "head_channels" in r.stderr, r.stderr


def test_bench_refuses_outputs_and_options_it_cannot_honour_before_running(tmp_path):
    """A --json / --plot target that is a folder or an unknown image type, a non-finite --cfg, and an option of the
    other mode: one line, exit 2, before any timing (nothing written)."""
    (tmp_path / "jdir.json").mkdir()
    base = ("bench", "arch:tiny-unet", "--steps", "1", "--repeat", "1", "--warmup", "1")
    for argv, match in ((["--json", "jdir.json"], "--json: cannot write jdir.json: expected a file path, found a folder"),
                        (["--plot", "p.xyz"], "--plot: expected a file name ending in one of"),
                        (["--cfg", "inf"], "--cfg: expected a finite number"),
                        (["--nfe", "4,8"], "--nfe: an option of the --quality mode, found in a latency run"),
                        (["--compile-mode", "default"], "--compile-mode: the mode of the diffusers torch.compile")):
        r = fastdiff(*base, *argv, cwd=tmp_path)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
    r = fastdiff("bench", "--quality", "--backends", "eager,triton", "--steps", "9", cwd=tmp_path)
    assert r.returncode == 2 and "--backends, --steps: options of the latency mode, found in a --quality run" \
        in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jdir.json"]


def test_bench_json_records_the_compile_mode(tmp_path):
    import json

    r = fastdiff("bench", "arch:tiny-unet", "--steps", "1", "--repeat", "1", "--warmup", "1", "--json", "b.json",
                 cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    settings = json.loads((tmp_path / "b.json").read_text())["settings"]
    assert "compile_mode" in settings and settings["compile_mode"] is None  # no compile comparison in this run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # no temp file left


def test_info_refuses_layer_options_without_a_model(tmp_path):
    for argv, match in ((["--backend", "triton"], "--backend: applies to a loaded MODEL's layers, found no MODEL"),
                        (["arch:tiny-unet", "--backend", "eager", "--kernel-ops", "all"],
                         "--kernel-ops: expected --backend triton")):
        r = fastdiff("info", *argv, cwd=tmp_path)
        assert r.returncode == 2 and match in r.stderr, (argv, r.stderr)


def test_info_on_an_exported_graph_and_unreadable_scheduler_files(tmp_path, monkeypatch):
    """`fastdiff info MODEL.onnx` reports the graph (it raised AttributeError on the missing PyTorch layers); a
    --scheduler file that is not JSON is one line of error (it was a raw JSONDecodeError / UnicodeDecodeError); info
    does not call the onnxruntime backend usable without onnx, which it exports with."""
    pytest.importorskip("onnx", reason="the exporter needs onnx")
    pytest.importorskip("onnxruntime", reason="the graph loads through onnxruntime")
    from fastdiff.commands import info

    r = fastdiff("export", "arch:tiny-unet", "--format", "onnx", "-o", "u.onnx", "--no-progress", cwd=tmp_path,
                 timeout=300)
    assert r.returncode == 0, r.stderr
    r = fastdiff("info", "u.onnx", cwd=tmp_path)
    assert r.returncode == 0 and "backend none (an exported graph: no PyTorch layers)" in r.stdout, r.stderr
    assert "u.onnx graph: any batch, latents of 16x16 only; CFG not folded" in r.stdout  # (what the export fixed)
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "binary.json").write_bytes(bytes(range(256)))
    for name, message in (("text.json", "expected JSON, found a parse error"),
                          ("binary.json", "expected a JSON text file, found binary data")):
        r = fastdiff("generate", "arch:tiny-unet", "--scheduler", name, "--steps", "1", "--n", "1", cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    real = info._version
    monkeypatch.setattr(info, "_version", lambda m: "not installed" if m == "onnx" else real(m))
    assert info.collect()["backends"]["onnxruntime"].startswith("no: onnx not installed")


def test_bench_counts_a_loop_variants_evaluations_and_refuses_contradictions(tmp_path, monkeypatch):
    """From a review: a loop variant's first call also records, warms up and captures its loop, which counted 4x
    its network evaluations (every run-5 +loop row read nfe=80 for 20 steps); +qkv+noqkv ran one of them under a
    label naming both."""
    from fastdiff import pipeline as pipeline_module
    from fastdiff.cli import main
    from fastdiff.commands.bench import parse_backend_variants
    from fastdiff.errors import BadArgumentError
    from test_graph_scopes import FakeGraph

    real_optimize = pipeline_module.Pipeline.optimize

    def optimize(self, config=None, graph_factory=None, **kw):  # a GPU's capture pattern on the CPU
        return real_optimize(self, config, graph_factory=FakeGraph if config is not None and config.cuda_graphs
                             else graph_factory, **kw)

    monkeypatch.setattr(pipeline_module.Pipeline, "optimize", optimize)
    rc = main(["bench", "arch:tiny-dit", "--backends", "eager,eager+loop", "--steps", "5", "--cfg", "4",
               "--repeat", "2", "--warmup", "2", "--json", str(tmp_path / "r.json")])
    rows = {r["backend"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rc == 0 and rows["eager"]["nfe"] == rows["eager+loop"]["nfe"] == 5
    assert rows["eager+loop"]["per_nfe_s"] == pytest.approx(rows["eager+loop"]["median_s"] / 5)
    assert rows["eager+loop"]["replay_host_per_step_s"] > 0 and rows["eager"]["dtype"] == "torch.float32"
    for bad in ("triton+qkv+noqkv", "triton+convbias+noconvbias", "triton+precompute+noprecompute"):
        with pytest.raises(BadArgumentError, match="choose one of"):
            parse_backend_variants(bad)


def test_bench_ratios_compare_per_evaluation_where_the_counts_differ():
    """A sampler diffusers has no scheduler for runs as DPM-Solver++ there, with another number of network calls:
    the ratio is per call then, and the table says so (a review: 7 calls against 4 read as 1.40x slower)."""
    from fastdiff.commands.bench_report import _ratios, format_table

    row = dict(status="ok", batch=1, median_s=0.7, per_nfe_s=0.1, nfe=7, p90_s=0.7, p99_s=0.7, per_step_s=0.1,
               images_per_s=1.4, warmup_overhead_s=0.0)
    same = dict(row, backend="same", median_s=0.4, per_nfe_s=0.1, nfe=4)
    theirs = dict(row, impl="diffusers", median_s=0.5, per_nfe_s=0.125, nfe=4)
    ratios = _ratios([dict(row, backend="fewer"), same], [theirs])
    assert [(r["backend"], round(r["ratio"], 3), r["per_nfe"]) for r in ratios] == [("fewer", 0.8, True),
                                                                                   ("same", 0.8, False)]
    table = format_table([dict(row, backend="fewer"), same], [theirs], ratios)
    assert [l.split()[-2] for l in table.splitlines()[2:4]] == ["0.80/nfe", "0.80"]


@pytest.mark.parametrize("args, match", [
    (["generate", "--steps", "abc"], "fastdiff generate: error: argument --steps: invalid int value: 'abc' (see "
                                     "fastdiff generate --help)"),
    (["export", "builtin:digits", "-o", "x.onnx"], "fastdiff export: error: the following arguments are required: "
                                                   "--format"),
    (["nosuch"], "fastdiff: error: argument COMMAND: invalid choice: 'nosuch'"),
])
def test_argparse_errors_are_one_line_too(tmp_path, args, match):
    """Bad arguments exit with status 2 and one line, argparse's own (a bad value, a missing flag) as well."""
    r = fastdiff(*args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and match in r.stderr, r.stderr


def test_generate_sampler_options(tmp_path):
    """--sampler-option KEY=VALUE hands the sampler its keyword options (Python literals, else strings): the output
    is generate()'s with them; a wrong option, a generate() argument or a malformed pair is one line on stderr."""
    import torch
    from safetensors.torch import load_file

    import fastdiff as fd

    r = fastdiff("generate", "arch:tiny-dit", "--sampler", "ddpm", "--steps", "3", "--n", "1", "--class", "1",
                 "--sampler-option", "variance=fixed_large", "--sampler-option", "s_noise=0.5", "--output-latents",
                 "lat.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe = fd.load("arch:tiny-dit")
    want = pipe.generate(seeds=[0], class_labels=[1], steps=3, sampler="ddpm", variance="fixed_large", s_noise=0.5,
                         progress=False)
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)
    for options, message in ((["bogus=1"], "'bogus' is no sampler's option"), (["size=4"], "no sampler's option"),
                             (["eta"], "expected KEY=VALUE"), (["clip_x0=1"], "takes a Python function"),
                             (["sigmas_to=[0.5, 'a']"], "expected a list of numbers"),
                             (["s_noise=1", "s_noise=0.5"], "given twice"),
                             (["eta=0.5"], "sampler 'ddpm': unknown option(s) ['eta']")):
        args = [a for o in options for a in ("--sampler-option", o)]
        r = fastdiff("generate", "arch:tiny-dit", "--sampler", "ddpm", "--steps", "1", "--class", "1", *args,
                     "--output-latents", "x.safetensors", "--no-progress", cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = fastdiff("generate", "arch:tiny-dit", "--sampler", "edm", "--steps", "2", "--class", "1", "--sampler-option",
                 "s_tmax=inf", "--sampler-option", "s_churn=0.5", "--output-latents", "x.safetensors", "--no-progress",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_cli_review_fixes_outputs(tmp_path):
    """From a review of the command line: a legal 240-byte file name was a traceback after the run (the temp name
    grew past 255 bytes); /proc passed os.access as root; -o "" wrote out.png; export wrote ONNX under any
    extension."""
    long = "r" * 240 + ".json"
    r = fastdiff("bench", "arch:tiny-unet", "--steps", "1", "--repeat", "1", "--warmup", "1", "--json", long,
                 cwd=tmp_path)
    assert r.returncode == 0 and json.loads((tmp_path / long).read_text())["complete"], r.stderr
    for argv, match in ((["bench", "arch:tiny-unet", "--steps", "1", "--json", "r" * 260 + ".json"],
                         "expected a file name of at most"),
                        (["generate", "arch:tiny-unet", "--steps", "1", "-o", ""], "found an empty one"),
                        (["export", "arch:tiny-unet", "--format", "onnx", "-o", "x.engine"],
                         "expected a .onnx file name for --format onnx"),
                        (["export", "arch:tiny-unet", "--format", "onnx", "-o", "noext"], "expected a .onnx")) + ((
                            (["bench", "arch:tiny-unet", "--steps", "1", "--json", "/proc/x.json"],
                             "no file can be made in /proc"),) if os.path.isdir("/proc") else ()):
        r = fastdiff(*argv, cwd=tmp_path)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [long]


def test_a_failed_png_write_leaves_the_latents_file_as_it_was(tmp_path, monkeypatch):
    """Every output is written to a temp name and renamed once all are written (the latents file was replaced
    before the PNG failed)."""
    from PIL import Image

    from fastdiff.cli import main

    keep = tmp_path / "keep.safetensors"
    keep.write_bytes(b"previous")

    def failing_save(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    assert main(["generate", "arch:tiny-unet", "--steps", "1", "--no-progress", "--output-latents", str(keep), "-o",
                 str(tmp_path / "o.png")]) == 2  # ("cannot write the output: disk full")
    assert keep.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_cli_review_fixes_inputs(tmp_path):
    """A 16-bit grayscale PNG is read (scaled to 8 bits) as its 8-bit twin; a pixel model's --output-latents file
    given back as --image is its [-1, 1] samples, whatever their sign; a LoRA file whose name ends in ':0.5' is
    that file."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    Image.fromarray(eight, mode="L").save(tmp_path / "i8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "i16.png")  # (16-bit grayscale PNG)
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    common = ("generate", "arch:tiny-unet", "--steps", "2", "--strength", "0.5", "--no-progress", "--seed", "3")
    outs = []
    for name in ("i8.png", "i16.png"):
        r = fastdiff(*common, "--image", name, "-o", f"from_{name}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs.append(np.asarray(Image.open(tmp_path / f"from_{name}")))
    assert np.array_equal(outs[0], outs[1])
    # a pixel model's latents file (3 channels here), all positive: the same as its PNG, not read as [0, 1]
    sample = torch.full((1, 3, 16, 16), 0.5)
    save_file({"latents": sample}, str(tmp_path / "lat.safetensors"))
    Image.fromarray(np.full((16, 16, 3), round((0.5 + 1) * 127.5), np.uint8)).save(tmp_path / "lat.png")
    pngs = []
    for name in ("lat.safetensors", "lat.png"):
        r = fastdiff(*common, "--image", name, "-o", f"o_{name}.png", cwd=tmp_path)
        assert r.returncode == 0 and "UserWarning" not in r.stderr, r.stderr
        pngs.append(np.asarray(Image.open(tmp_path / f"o_{name}.png")).astype(int))
    assert np.abs(pngs[0] - pngs[1]).max() <= 1
    from fastdiff.commands.generate import _lora_args

    odd = tmp_path / "a:0.5"
    odd.write_bytes(b"x")
    assert _lora_args([str(odd)]) == [(str(odd), 1.0)]
    assert _lora_args([f"{odd}:0.25"]) == [(str(odd), 0.25)]


def test_api_errors_name_the_flag_to_change():
    """An error raised by generate() names its keyword; the command line adds the flag that sets it (the first
    mention only, never inside a longer name, never where the flag is named already)."""
    from fastdiff.cli import _subparsers, build_parser, generate_keywords, name_flags

    generate = _subparsers(build_parser()).choices["generate"]
    keywords = generate_keywords()

    def named(message):
        return name_flags(message, generate, keywords)

    assert named("cfg_scale != 1 needs a conditional model; cfg_scale is") == \
        "cfg_scale (--cfg) != 1 needs a conditional model; cfg_scale is"
    assert named("class_labels: expected labels in [0, 9]") == "class_labels (--class): expected labels in [0, 9]"
    assert named("denoising_end: 0.99 leaves no step to run") == \
        "denoising_end (--denoising-end): 0.99 leaves no step to run"
    assert named("mask_image: expected; controlnet_conditioning_scale, control_guidance_start") == \
        "mask_image (--mask): expected; controlnet_conditioning_scale (--controlnet-scale), control_guidance_start " \
        "(--control-start)"
    # a longer flag that starts like the keyword's is not the keyword's flag
    assert named("class_labels: expected labels (see --classifier-scale)") == \
        "class_labels (--class): expected labels (see --classifier-scale)"
    # a possessive is no quote: the keyword after it is named
    assert named("with guidance diffusers' form stacks them: ip_adapter_masks x") == \
        "with guidance diffusers' form stacks them: ip_adapter_masks (--ip-adapter-mask) x"
    for untouched in ("--denoising-end: given twice", "negative_cfg_scale_x is not a flag", "pipe.cfg_scale is set",
                      "height/width: this DiT takes 8x8 latents only",
                      "text_encoder reads prompt",  # (a component's name, not generate()'s keyword)
                      # file names and quoted values, paths, calls
                      "--image: could not read 'control_image.png' as an image", "found 'class_labels'",
                      'found "negative_prompt"', "cannot write negative_prompt/x/out.png", "pass ip_adapter_image=",
                      "found class_labels.png"):
        assert named(untouched) == untouched


def test_an_api_error_reaches_the_user_with_its_flag(tmp_path):
    r = fastdiff("generate", "arch:tiny-unet", "--steps", "1", "--cfg", "2", cwd=tmp_path)
    assert r.returncode == 2 and "cfg_scale (--cfg) != 1 needs a conditional model" in r.stderr, r.stderr
