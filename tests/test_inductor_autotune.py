"""bench/inductor_autotune.py: Inductor's tuning results saved from one cache folder and seeded into a fresh
one unchanged, where Inductor looks them up (the layout of torch._inductor's caches), without clobbering what
the fresh cache already holds and without writing outside it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import inductor_autotune  # noqa: E402

TIMINGS = {"system": {"hash": "abc"}, "cache": {"mm": {"2048x640": {"highest": {"triton_mm_1": 0.0122}}}}}


def _cache(root: Path) -> Path:
    """A cache folder as Inductor leaves it: timings, kernels with chosen configs, and compiled output."""
    (root / "cache").mkdir(parents=True)
    (root / "cache" / "abc123").write_text(json.dumps(TIMINGS))
    (root / "cache" / "def456").write_text(json.dumps({"cache": {}}))  # another device or software stack
    (root / "cache" / ".123.456.tmp").write_text('{"sys')  # Inductor's write_atomic, mid-write
    for sub, key, block in (("x1", "k1", 64), ("q7", "k2", 1024)):
        (root / sub).mkdir()
        (root / sub / f"{key}.py").write_text("# a generated kernel")
        (root / sub / f"{key}.best_config").write_text(json.dumps({"XBLOCK": block, "num_warps": 4}))
    (root / "x1" / "torn.best_config").write_text('{"XBLOCK": 12')  # being written this moment
    (root / "fxgraph").mkdir()
    (root / "fxgraph" / "graph.bin").write_bytes(b"\0" * 64)
    return root


def test_save_then_seed_puts_every_result_where_inductor_looks(tmp_path):
    saved = tmp_path / "saved"
    counts = inductor_autotune.save(_cache(tmp_path / "run1"), saved)
    assert counts == {"timings": 2, "best_configs": 2}  # torn files skipped, compiled output not carried
    # two files whatever the number of stacks and kernels (the device tool returns at most 8)
    assert sorted(p.name for p in saved.iterdir()) == [inductor_autotune.BUNDLE, inductor_autotune.TIMINGS]

    fresh = tmp_path / "run2"
    assert inductor_autotune.seed(saved, fresh) == {"timings": 2, "best_configs": 2}
    assert json.loads((fresh / "cache" / "abc123").read_text()) == TIMINGS
    assert sorted(p.name for p in (fresh / "cache").iterdir()) == ["abc123", "def456"]
    assert json.loads((fresh / "x1" / "k1.best_config").read_text()) == {"XBLOCK": 64, "num_warps": 4}
    assert json.loads((fresh / "q7" / "k2.best_config").read_text())["XBLOCK"] == 1024
    assert not (fresh / "x1" / "torn.best_config").exists()


def test_seed_keeps_what_the_cache_already_learnt(tmp_path):
    saved = tmp_path / "saved"
    inductor_autotune.save(_cache(tmp_path / "run1"), saved)
    fresh = tmp_path / "run2"
    (fresh / "cache").mkdir(parents=True)
    (fresh / "cache" / "abc123").write_text('{"newer": 1}')
    (fresh / "x1").mkdir()
    (fresh / "x1" / "k1.best_config").write_text('{"XBLOCK": 8}')
    assert inductor_autotune.seed(saved, fresh) == {"timings": 1, "best_configs": 1}
    assert (fresh / "cache" / "abc123").read_text() == '{"newer": 1}'
    assert (fresh / "x1" / "k1.best_config").read_text() == '{"XBLOCK": 8}'


def test_a_later_save_keeps_the_seeded_results(tmp_path):
    """Run 2 seeds run 1's results, tunes one more kernel, and saves: the bundle holds all three."""
    saved = tmp_path / "saved"
    inductor_autotune.save(_cache(tmp_path / "run1"), saved)
    fresh = tmp_path / "run2"
    inductor_autotune.seed(saved, fresh)
    (fresh / "zz").mkdir()
    (fresh / "zz" / "k3.best_config").write_text('{"XBLOCK": 32}')
    assert inductor_autotune.save(fresh, saved)["best_configs"] == 3
    bundle = json.loads((saved / inductor_autotune.BUNDLE).read_text())
    assert sorted(bundle) == ["q7/k2.best_config", "x1/k1.best_config", "zz/k3.best_config"]


_OUTSIDE_THE_LAYOUT = [(inductor_autotune.BUNDLE, name, "best_config inside the cache folder") for name in
                       ("../escape.best_config", "x1/../../escape.best_config", "x1/k1.py", "k1.best_config",
                        "a/b/k1.best_config")]
_OUTSIDE_THE_LAYOUT += [(inductor_autotune.TIMINGS, name, "not a file name") for name in ("../escape", "a/b", ".hidden")]


@pytest.mark.parametrize("bundle,name,message", _OUTSIDE_THE_LAYOUT)
def test_seed_refuses_an_entry_outside_the_cache_layout(tmp_path, bundle, name, message):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / bundle).write_text(json.dumps({name: "{}"}))
    with pytest.raises(ValueError, match=message):
        inductor_autotune.seed(saved, tmp_path / "cache_dir")
    assert not any(p.name.startswith("escape") for p in tmp_path.rglob("*"))


def test_save_skips_a_file_that_vanishes_while_read(tmp_path, monkeypatch):
    """Inductor renames its temporary files into place: one listed may be gone when read."""
    root = _cache(tmp_path / "run1")
    real_read = Path.read_text

    def vanishing(self, *a, **k):
        if self.name == "abc123":
            raise FileNotFoundError(self)
        return real_read(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", vanishing)
    assert inductor_autotune.save(root, tmp_path / "s") == {"timings": 1, "best_configs": 2}


def test_seed_from_a_missing_folder_seeds_nothing(tmp_path):
    assert inductor_autotune.seed(tmp_path / "none", tmp_path / "c") == {"timings": 0, "best_configs": 0}
    assert (tmp_path / "c" / "cache").is_dir()


def test_command_line(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "inductor_autotune.py"
    _cache(tmp_path / "run1")
    done = subprocess.run([sys.executable, str(script), "save", str(tmp_path / "run1"), str(tmp_path / "s")],
                          capture_output=True, text=True, check=True)
    assert "2 timing file(s), 2 kernel config(s)" in done.stdout
    bad = subprocess.run([sys.executable, str(script), "load"], capture_output=True, text=True)
    assert bad.returncode == 2 and "save CACHE_DIR DEST_DIR" in bad.stderr
