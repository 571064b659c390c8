"""k-diffusion's own samplers and model wrappers (crowsonkb/k-diffusion, the pip package ``k-diffusion``) as the
reference of the parity tests.

Its ``__init__`` imports the whole training stack (wandb, CLIP, clean-fid, torchvision, ...), which the tests do not
need and CI does not install (``.ci/run`` installs the package with ``--no-deps``). So ``sampling.py`` and
``external.py`` are loaded from the installed files under a private package name, next to a ``utils`` module that
holds only the one function they call, ``append_dims``, compiled from k-diffusion's own ``utils.py`` source (whose
imports are never run).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import types

import pytest

PACKAGE = "_k_diffusion_ref"


def _utils_module(root: str) -> types.ModuleType:
    """A module holding ``append_dims`` exactly as k-diffusion's utils.py defines it."""
    with open(os.path.join(root, "utils.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "append_dims"]
    if len(defs) != 1:
        pytest.skip("k-diffusion's utils.py has no append_dims (an unexpected version)")
    module = types.ModuleType(f"{PACKAGE}.utils")
    exec(compile(ast.Module(body=defs, type_ignores=[]), os.path.join(root, "utils.py"), "exec"), module.__dict__)
    return module


def load(name: str = "sampling") -> types.ModuleType:
    """k-diffusion's ``sampling`` or ``external`` module; skips (with the reason) where k-diffusion or what
    sampling.py imports (scipy, torchdiffeq, torchsde) is missing."""
    key = f"{PACKAGE}.{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.find_spec("k_diffusion")  # (finds the folder; runs nothing)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    for needed in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        pytest.importorskip(needed, reason=f"k-diffusion's sampling.py imports {needed}")
    root = list(spec.submodule_search_locations)[0]
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [root]
        sys.modules[PACKAGE] = package
        sys.modules[f"{PACKAGE}.utils"] = package.utils = _utils_module(root)
    for part in ("sampling", "external") if name == "external" else ("sampling",):
        full = f"{PACKAGE}.{part}"
        if full not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(full, os.path.join(root, f"{part}.py"))
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[full] = module
            module_spec.loader.exec_module(module)
            setattr(sys.modules[PACKAGE], part, module)
    return sys.modules[key]
