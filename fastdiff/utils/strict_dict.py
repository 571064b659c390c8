"""Config dataclasses from dicts: every unknown field is refused by name, never silently dropped."""

from __future__ import annotations

import dataclasses

from ..errors import UnsupportedConfigError


def known_fields(cls, d: dict, model: str, skip_private: bool = True) -> dict:
    """The entries of ``d`` that are fields of dataclass ``cls``.

    An unknown key raises UnsupportedConfigError naming it and listing the fields; with
    ``skip_private`` keys starting with ``_`` (diffusers' ``_class_name`` and the like) are metadata
    and skipped.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    for k in sorted(d):
        if k not in names and not (skip_private and k.startswith("_")):
            raise UnsupportedConfigError(k, d[k], supported=sorted(names), model=model)
    return {k: v for k, v in d.items() if k in names}
