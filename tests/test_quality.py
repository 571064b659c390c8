"""Quality vs NFE: NFE accounting per sampler, the table on builtin:digits, and `fastdiff bench --quality`."""

import json
import subprocess
import sys

import pytest

import fastdiff
from fastdiff.errors import BadArgumentError
from fastdiff.metrics.quality import count_nfe, format_table, quality_table, steps_for_nfe

pytest.importorskip("sklearn", reason="the digits metric needs scikit-learn's bundled digits")


@pytest.fixture(scope="module")
def digits():
    return fastdiff.load("builtin:digits")


@pytest.mark.parametrize("sampler,steps,nfe", [("ddim", 7, 7), ("dpmpp_2m", 7, 7), ("heun", 4, 7), ("edm", 1, 1)])
def test_nfe_is_counted(digits, sampler, steps, nfe):
    assert count_nfe(digits, sampler, steps) == nfe


def test_steps_for_budget(digits):
    assert steps_for_nfe(digits, "heun", 4) == 2  # 2 steps = 3 evaluations; 3 steps would need 5
    assert steps_for_nfe(digits, "unipc", 10) == 10


def test_quality_table_cells(digits):
    rows = quality_table(digits, ["ddim", "heun"], [3], per_class=2, cfg_scale=3.0)
    assert [(r.sampler, r.steps, r.nfe) for r in rows] == [("ddim", 3, 3), ("heun", 2, 3)]
    assert all(r.digits_fd > 0 and 0 <= r.accuracy <= 1 for r in rows)
    text = format_table(rows)
    assert "digits-FD" in text and "NFE 3" in text


def test_quality_needs_a_digits_model():
    with pytest.raises(BadArgumentError, match="digits"):
        quality_table(fastdiff.load("arch:tiny-unet"), ["ddim"], [2], per_class=2)


def test_bench_quality_cli(tmp_path):
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "-m", "fastdiff.cli", "bench", "--quality", "--nfe", "2", "--samplers",
                        "ddim,dpmpp_2m", "--per-class", "2", "--json", str(out)], capture_output=True, text=True,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert {row["sampler"] for row in data["rows"]} == {"ddim", "dpmpp_2m"}
    assert "class accuracy" in r.stdout
    # the per-cell progress lines go to stderr: stdout holds the table once, not each row twice
    assert "NFE   2" in r.stderr and "NFE   2" not in r.stdout


def test_quality_table_on_a_flow_model_skips_what_it_refuses():
    """On builtin:digits_flow the default sampler list (and `fastdiff bench --quality`'s) leaves out tcd, which a
    flow model refuses; every other sampler gets its cells."""
    import os

    from fastdiff.checkpoints.presets import PRESET_DIR
    from fastdiff.flow import REFUSED
    from fastdiff.sampling import SAMPLERS

    if not os.path.isfile(os.path.join(PRESET_DIR, "digits_flow", "model.safetensors")):
        pytest.skip("the builtin:digits_flow weights are absent (training/train_digits.py --objective flow)")
    rows = quality_table(fastdiff.load("builtin:digits_flow"), None, [2], per_class=2)
    assert {r.sampler for r in rows} == set(SAMPLERS) - set(REFUSED)
