"""Config dataclasses from dicts: every unknown field is refused by name, never silently dropped."""

from __future__ import annotations

import collections.abc
import dataclasses
import numbers
import typing

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


def _matches(value, tp) -> bool:
    """Whether ``value`` (from JSON or Python) fits the annotation ``tp``: bool is not an int here, an int is a
    float, a list or tuple is a Sequence; an annotation this does not know accepts anything."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin is typing.Union:
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (collections.abc.Sequence, list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and args[0] is not Ellipsis else typing.Any
        return all(_matches(v, item) for v in value)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True


def diffusers_fields(cls, d: dict, model: str) -> dict:
    """The fields of dataclass ``cls`` in a diffusers ``config.json`` dict ``d``: keys starting with ``_`` are
    metadata; any other key ``cls`` lacks is a setting the native model does not implement, refused by name."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    for key in sorted(d):
        if not key.startswith("_") and key not in names:
            raise UnsupportedConfigError(key, d[key], supported="(not implemented by fastdiff)", model=model)
    return {k: v for k, v in d.items() if k in names}


def plain_dict(cfg) -> dict:
    """``dataclasses.asdict`` with tuples as lists (what JSON round-trips)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def check_field_types(cfg, model: str) -> None:
    """Every field of dataclass ``cfg`` has its annotated type, else UnsupportedConfigError naming the field, the
    value and the type: a hand-edited config's ``"upcast_attention": "yes"`` is refused, not taken as true, and
    ``"norm_eps": "small"`` fails here, not as a TypeError deep in a forward pass."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp = hints.get(f.name)
        value = getattr(cfg, f.name)
        if tp is not None and not _matches(value, tp):
            raise UnsupportedConfigError(f.name, value, supported=_type_name(tp), model=model)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (collections.abc.Sequence, list, tuple):
        items = {int: "ints", float: "numbers", str: "strings", bool: "true / false values"}
        return f"a list of {items.get(args[0], _type_name(args[0]))}" if args and args[0] is not Ellipsis else "a list"
    return {bool: "true / false", int: "an int", float: "a number", str: "a string", dict: "a dict"}.get(
        tp, getattr(tp, "__name__", str(tp)))
