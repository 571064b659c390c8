import pytest

import fastdiff
from fastdiff.errors import StateDictMismatchError, UnsupportedConfigError


def test_mismatch_message_counts_and_names_first_keys():
    e = StateDictMismatchError(missing=[f"a{i}" for i in range(7)], unexpected=["zz"],
                               mismatched=[("w", (4, 3), (4, 2))])
    msg = str(e)
    assert "7 missing" in msg and "a0" in msg and "+2 more" in msg and "a6" not in msg
    assert "1 unexpected" in msg and "zz" in msg
    assert "expected (4, 3), found (4, 2)" in msg


def test_unsupported_config_names_field_and_value():
    msg = str(UnsupportedConfigError("act_fn", "gelu", supported=["silu"], model="UNet"))
    assert "act_fn" in msg and "'gelu'" in msg and "silu" in msg


@pytest.mark.parametrize("content,why", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 3417600\n", "git-lfs pointer"),
    (b"<!DOCTYPE html><html><body>Access denied</body></html>", "looks like a text file"),
    (b"hello world, this is not a checkpoint\n" * 10, "expected a torch file"),
    (bytes(range(256)) * 16, "expected a torch file"),
])
def test_a_file_that_is_not_a_checkpoint_is_corrupt_not_unsafe(tmp_path, content, why):
    """Only a real pickle of Python objects is 'unsafe'; text, HTML, git-lfs pointers and random bytes are
    files that are not checkpoints, and say so."""
    from fastdiff.errors import CorruptCheckpointError

    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=why):
        fastdiff.load(str(path))
