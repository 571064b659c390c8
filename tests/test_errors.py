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
