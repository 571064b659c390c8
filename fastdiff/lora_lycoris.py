"""LyCORIS LoHa, LoKr, full, (IA)^3, OFT / BOFT, GLoRA and norm layers in kohya-style files
(``lora_unet_<module>.hada_w1_a``, ``.lokr_w1``, ``.diff``, ``.on_input``, ``.oft_blocks``, ``.a1.weight``, ``.w_norm``):
the update each makes to its layer's weight, as LyCORIS's modules compute it in training and ComfyUI /
AUTOMATIC1111 merge it (diffusers does not read these files).

* LoHa: ``scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` (a Hadamard product of two low-rank matrices). A convolution's
  factors may come through Tucker cores (``hada_t1`` / ``hada_t2``: (rank, rank, k, k), with w*_a (rank, out) and
  w*_b (rank, in)). ``scale`` = alpha / rank (``hada_w1_b``'s rows), 1 without an alpha.
* LoKr: ``scale * kron(w1, w2)``: w1 is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; w2 is ``lokr_w2``, ``lokr_w2_a @
  lokr_w2_b``, or its Tucker form (``lokr_t2`` with w2_a (rank, out), w2_b (rank, in)). A convolution's w1 multiplies
  whole kernels of w2. ``scale`` = alpha / rank, the rank of a decomposed half (w2's where both are); 1 where
  neither half is decomposed (LyCORIS then trains without an alpha) or the file has no alpha. (One layout differs
  from LyCORIS's training forward, as in ComfyUI, AUTOMATIC1111 and LyCORIS's own reload: both halves whole and
  ``rs_lora``, trained at a scale of sqrt(rank) that the file does not record.)

LyCORIS's DoRA (``dora_scale``, any of the three kinds, LoCon's too): the weight plus the whole update, rescaled to
``dora_scale`` over its norm (+ float32's eps) per output row, or per input column where ``dora_scale`` is
(1, in, ...) (``wd_on_out=False``, and LyCORIS's older files) (``dora_merged``). At a LoRA scale of 1 that is
LyCORIS's forward; another scale moves the weight that part of the way from the original to it, as ComfyUI does
(LyCORIS's own multiplier rescales the factor instead, and keeps the whole update at 0). (ComfyUI's per-row case
divides by the original weight's norms, not by those of the weight plus the update that LyCORIS trained with.)

* Full: ``scale * diff`` (and ``scale * diff_b`` on the bias). (IA)^3: the weight times ``1 + scale * factor`` per
  output or input channel. OFT / BOFT: the output rows turned by block rotations (``OFTLayer``). GLoRA: ``scale *
  alpha / rank * (W a1 a2 + b1 b2)`` (``GLoRALayer``; like LoKr's, a ``rs_lora`` factor is not in the file). A
  GroupNorm's / LayerNorm's ``w_norm`` / ``b_norm``: ``scale *`` each on its weight and bias. None of these has a
  DoRA.

Each has the interface of ``fastdiff.lora.LoraLayer`` that merging uses: ``check(shape)``, ``delta(shape)``,
``magnitude`` (PEFT's DoRA: None here) and ``dora_scale``; (IA)^3, OFT and GLoRA, whose update reads the weight, give
``update_of(weight, scale)`` instead of ``delta``, and full and norm layers ``check_bias`` / ``bias_delta`` as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .errors import CheckpointError

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL_KEYS = ("diff", "diff_b")
IA3_KEYS = ("weight", "on_input")
OFT_KEYS = ("oft_blocks", "rescale")
GLORA_KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
NORM_KEYS = ("w_norm", "b_norm")


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored kernel: core (rank, rank, k, k), a (rank, out), b (rank, in) -> (out, in, k, k)."""
    return torch.einsum("i j ..., j r, i p -> p r ...", core.float(), b.float(), a.float())


def _tucker_shape(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor, what: str) -> tuple:
    if core.dim() < 3 or a.dim() != 2 or b.dim() != 2 or tuple(core.shape[:2]) != (a.shape[0], b.shape[0]):
        raise CheckpointError(f"LyCORIS: {what}: expected a Tucker core (rank, rank, k, k) with a (rank, out) and b "
                              f"(rank, in), found {tuple(core.shape)}, {tuple(a.shape)} and {tuple(b.shape)}")
    return (int(a.shape[1]), int(b.shape[1]), *core.shape[2:])


def _product_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple:
    """The shape of a @ b.flatten(1) (a: (out, rank), b: (rank, in...)), or a clear error."""
    if a.dim() < 2 or b.dim() < 2 or math.prod(a.shape[1:]) != b.shape[0]:
        raise CheckpointError(f"LyCORIS: {what}: expected (out, rank) and (rank, in) factors, found "
                              f"{tuple(a.shape)} and {tuple(b.shape)}")
    return (int(a.shape[0]), math.prod(b.shape[1:]))


def _fits(update: tuple, shape: torch.Size, what: str) -> None:
    """An update of shape ``update`` adds to a weight of ``shape``: the same output rows and inputs per row; a
    convolution-shaped update only to a convolution of its kernel, or a 1x1 one to a linear weight (older SD 2.x
    files' proj_in / proj_out, as kohya's LoRAs and ComfyUI take them)."""
    fits = len(shape) >= 2 and update[0] == shape[0] and math.prod(update[1:]) == math.prod(shape[1:])
    kernel = len(update) > 2 and (len(shape) > 2 or math.prod(update[2:]) != 1)
    if not fits or (kernel and tuple(update) != tuple(shape)):
        raise CheckpointError(f"LyCORIS: {what}: an update of {tuple(update)} for a weight of {tuple(shape)}")


def dora_axis(dora_scale: torch.Tensor, shape: torch.Size) -> int:
    """The axis LyCORIS's DoRA normalizes a weight of ``shape`` along: 0 (a norm per output row: ``dora_scale``
    (out, 1, ...)) or 1 (per input column: (1, in, ...)); a clear error for anything else."""
    if len(shape) >= 2 and dora_scale.dim() == len(shape) and math.prod(dora_scale.shape[2:]) == 1:
        if tuple(dora_scale.shape[:2]) == (shape[0], 1):
            return 0
        if tuple(dora_scale.shape[:2]) == (1, shape[1]):
            return 1
    raise CheckpointError(f"LyCORIS: dora_scale {tuple(dora_scale.shape)} for a weight of {tuple(shape)}: expected "
                          f"one per output row ({shape[0]}, 1, ...) or per input column (1, {shape[1]}, ...)")


def dora_merged(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, scale: float) -> torch.Tensor:
    """LyCORIS's DoRA of ``weight`` (float32) with its whole ``delta``, at a LoRA ``scale`` (see the module's
    docstring)."""
    axis = dora_axis(dora_scale, weight.shape)
    merged = weight + delta
    norms = merged.transpose(0, axis).flatten(1).norm(dim=1)  # (rows or columns,)
    norms = norms.view(-1, *[1] * (weight.dim() - 1)).transpose(0, axis) + torch.finfo(torch.float32).eps
    dora = merged * (dora_scale.to(weight.device, torch.float32) / norms)
    return weight + scale * (dora - weight)


def _scale(alpha: Optional[float], rank: Optional[int]) -> float:
    return 1.0 if alpha is None or rank is None else alpha / rank


@dataclass
class LoHaLayer:
    """One layer's LoHa update (the ``hada_*`` tensors of one module)."""
    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: Optional[torch.Tensor] = None
    t2: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    dora_scale: Optional[torch.Tensor] = None  # LyCORIS's DoRA: (out, 1, ...) or (1, in, ...)
    magnitude = None  # (PEFT's DoRA: never in these files)
    KEYS: ClassVar[tuple] = LOHA_KEYS  # (the key suffixes it reads)

    @staticmethod
    def _half_shape(a, b, t, what) -> tuple:
        return _tucker_shape(t, a, b, what) if t is not None else _product_shape(a, b, what)

    def check(self, shape: torch.Size) -> None:
        if (self.t1 is None) != (self.t2 is None):
            raise CheckpointError("LyCORIS: LoHa: expected both Tucker cores (hada_t1, hada_t2) or neither")
        first = self._half_shape(self.w1_a, self.w1_b, self.t1, "LoHa hada_w1_a / hada_w1_b")
        second = self._half_shape(self.w2_a, self.w2_b, self.t2, "LoHa hada_w2_a / hada_w2_b")
        if first != second:
            raise CheckpointError(f"LyCORIS: LoHa: its two halves disagree: {first} and {second}")
        _fits(first, shape, "LoHa")
        if self.dora_scale is not None:
            dora_axis(self.dora_scale, shape)

    @staticmethod
    def _half(a, b, t) -> torch.Tensor:
        return _tucker(t, a, b) if t is not None else a.float().flatten(1) @ b.float().flatten(1)

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The float32 update of a weight of ``shape``."""
        self.check(shape)
        rank = int(self.w1_b.shape[0])
        update = self._half(self.w1_a, self.w1_b, self.t1) * self._half(self.w2_a, self.w2_b, self.t2)
        return (update * _scale(self.alpha, rank)).reshape(shape)


@dataclass
class LoKrLayer:
    """One layer's LoKr update (the ``lokr_*`` tensors of one module): each half given whole or decomposed."""
    w1: Optional[torch.Tensor] = None
    w1_a: Optional[torch.Tensor] = None
    w1_b: Optional[torch.Tensor] = None
    w2: Optional[torch.Tensor] = None
    w2_a: Optional[torch.Tensor] = None
    w2_b: Optional[torch.Tensor] = None
    t2: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    dora_scale: Optional[torch.Tensor] = None
    magnitude = None
    KEYS: ClassVar[tuple] = LOKR_KEYS

    def _halves_given(self) -> None:
        for half, whole, a, b in (("w1", self.w1, self.w1_a, self.w1_b), ("w2", self.w2, self.w2_a, self.w2_b)):
            if (whole is None) == (a is None or b is None) or (a is None) != (b is None):
                raise CheckpointError(f"LyCORIS: LoKr: expected lokr_{half}, or lokr_{half}_a and lokr_{half}_b")
        if self.t2 is not None and self.w2 is not None:
            raise CheckpointError("LyCORIS: LoKr: lokr_t2 (a Tucker core) without lokr_w2_a / lokr_w2_b")

    def _shapes(self) -> tuple:
        self._halves_given()
        if self.w1 is not None:
            if self.w1.dim() != 2:
                raise CheckpointError(f"LyCORIS: LoKr: expected lokr_w1 (a, b), found {tuple(self.w1.shape)}")
            first = tuple(self.w1.shape)
        else:
            first = _product_shape(self.w1_a, self.w1_b, "LoKr lokr_w1_a / lokr_w1_b")
        if self.w2 is not None:
            second = tuple(self.w2.shape)
        elif self.t2 is not None:
            second = _tucker_shape(self.t2, self.w2_a, self.w2_b, "LoKr lokr_t2 / lokr_w2_a / lokr_w2_b")
        else:
            second = _product_shape(self.w2_a, self.w2_b, "LoKr lokr_w2_a / lokr_w2_b")
        if len(second) < 2:
            raise CheckpointError(f"LyCORIS: LoKr: expected a matrix or kernels for w2, found {second}")
        return first, second

    def check(self, shape: torch.Size) -> None:
        first, second = self._shapes()
        update = (first[0] * second[0], first[1] * second[1], *second[2:])  # kron's shape
        _fits(update, shape, "LoKr")
        if self.dora_scale is not None:
            dora_axis(self.dora_scale, shape)

    @property
    def rank(self) -> Optional[int]:
        """The rank of the decomposed half (w2's first, as ComfyUI reads it), None where neither is."""
        if self.w2 is None:
            return int(self.w2_b.shape[0])
        return None if self.w1 is not None else int(self.w1_b.shape[0])

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The float32 update of a weight of ``shape``."""
        self.check(shape)
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2_a, self.w2_b)
        else:
            w2 = self.w2_a.float() @ self.w2_b.float().flatten(1)
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))  # (a convolution's: one factor per kernel of w2)
        # (kron needs contiguous operands: an einsum's result may not be)
        return (torch.kron(w1.contiguous(), w2.contiguous()) * _scale(self.alpha, self.rank)).reshape(shape)


@dataclass
class FullLayer:
    """LyCORIS's full fine-tune of one layer (``diff``, and ``diff_b`` where the layer has a bias): the whole update,
    as trained (no rank, no alpha)."""
    diff: torch.Tensor  # the weight's shape
    diff_b: Optional[torch.Tensor] = None  # (out,)
    dora_scale = None
    magnitude = None
    KEYS: ClassVar[tuple] = FULL_KEYS
    KIND: ClassVar[str] = "full"  # (for the errors: the kind, and the name of its bias's tensor)

    def check(self, shape: torch.Size) -> None:
        _fits(tuple(self.diff.shape), shape, "full (diff)")

    def check_bias(self, bias: Optional[torch.Tensor]) -> None:
        if self.diff_b is None:
            return
        what = f"LyCORIS: {self.KIND}: {self.KEYS[1]} {tuple(self.diff_b.shape)}"
        if bias is None:
            raise CheckpointError(f"{what} for a layer without a bias")
        if self.diff_b.numel() != bias.numel():
            raise CheckpointError(f"{what} for a bias of {tuple(bias.shape)}")

    def delta(self, shape: torch.Size) -> torch.Tensor:
        self.check(shape)
        return self.diff.float().reshape(shape)

    def bias_delta(self) -> Optional[torch.Tensor]:
        return None if self.diff_b is None else self.diff_b.float().reshape(-1)


@dataclass
class NormLayer(FullLayer):
    """LyCORIS's update of a GroupNorm / LayerNorm (``w_norm``, ``b_norm``): ``scale *`` each, added to its weight and
    bias."""
    KEYS: ClassVar[tuple] = NORM_KEYS
    KIND: ClassVar[str] = "norm"

    def check(self, shape: torch.Size) -> None:
        if self.diff.numel() != math.prod(shape) or len(shape) != 1:
            raise CheckpointError(f"LyCORIS: norm: w_norm {tuple(self.diff.shape)} for a weight of {tuple(shape)} "
                                  f"(expected a GroupNorm's / LayerNorm's (channels,))")


@dataclass
class IA3Layer:
    """LyCORIS's (IA)^3 of one layer (``weight``: one factor per input or output channel; ``on_input``: which):
    the weight times (1 + scale * factor) along that axis, as LyCORIS's forward computes it (the bias stays)."""
    factors: torch.Tensor  # (channels,), or (1, channels, 1, ...) for a convolution
    on_input: bool
    dora_scale = None
    magnitude = None
    KEYS: ClassVar[tuple] = IA3_KEYS

    def check(self, shape: torch.Size) -> None:
        axis = 1 if self.on_input else 0
        if len(shape) < 2 or self.factors.numel() != int(shape[axis]):
            raise CheckpointError(f"LyCORIS: (IA)^3: {self.factors.numel()} factors for the "
                                  f"{'input' if self.on_input else 'output'} channels of a weight of {tuple(shape)}")

    def update_of(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 update of ``weight`` at LoRA ``scale`` (it scales the weight: unlike the additive kinds it
        reads it)."""
        self.check(weight.shape)
        axis = 1 if self.on_input else 0
        view = [1] * weight.dim()
        view[axis] = -1
        return weight.float() * self.factors.to(weight.device, torch.float32).reshape(view) * scale


@dataclass
class OFTLayer:
    """LyCORIS's OFT of one layer (``oft_blocks``; ``alpha``: the constraint; ``rescale``: optional per-row factors):
    the weight's output rows turned by orthogonal blocks, as LyCORIS's forward computes it.

    Each block's rotation is the Cayley transform R = (I + Q)(I - Q)^-1 of Q = B - B^T, with Q scaled down to a norm
    of alpha * out where it is larger (alpha 0 or none: no constraint). Diagonal OFT (blocks (n, b, b), n * b = out):
    each group of b rows becomes (scale * (R - I) + I)^T of them. Butterfly OFT (``BOFT``, blocks (m, n, b, b)): m
    stages, stage i pairing rows 2^i * b / 2 apart into blocks of b and turning each by scale * (R - I) + I. Then
    each row times ``rescale``. kohya's own OFT (sd-scripts' ``networks.oft``, ``oft_unet_*`` files) is the diagonal
    kind with ``always_constrained``: there the limit holds whatever alpha is (an alpha of 0: no rotation)."""
    blocks: torch.Tensor  # (n, b, b), or (m, n, b, b) for BOFT
    alpha: Optional[float] = None
    rescale: Optional[torch.Tensor] = None  # (out, 1, ...)
    always_constrained: bool = False
    dora_scale = None
    magnitude = None
    KEYS: ClassVar[tuple] = OFT_KEYS

    def check(self, shape: torch.Size) -> None:
        blocks = self.blocks
        if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
            raise CheckpointError(f"LyCORIS: OFT: expected oft_blocks (n, b, b) or BOFT's (m, n, b, b), found "
                                  f"{tuple(blocks.shape)}")
        n, b = int(blocks.shape[-3]), int(blocks.shape[-1])
        if len(shape) < 2 or n * b != int(shape[0]):
            raise CheckpointError(f"LyCORIS: OFT: blocks {tuple(blocks.shape)} for a weight of {tuple(shape)} (expected "
                                  f"n * b = {int(shape[0]) if len(shape) else '?'} output rows)")
        # (BOFT's last stage pairs rows 2^(m-1) * b / 2 apart: the rows must hold whole pairs of such spans)
        if blocks.dim() == 4 and (b % 2 or n * b % (2 ** (int(blocks.shape[0]) - 1) * b)):
            raise CheckpointError(f"LyCORIS: BOFT: blocks {tuple(blocks.shape)}: expected an even block size b and "
                                  f"n * b rows a multiple of 2^(m-1) * b (the last stage's pairs), found b = {b} and "
                                  f"{n * b} rows")
        if self.rescale is not None and self.rescale.numel() != int(shape[0]):
            raise CheckpointError(f"LyCORIS: OFT: rescale {tuple(self.rescale.shape)} for {int(shape[0])} output rows")

    def _rotations(self, device) -> torch.Tensor:
        """The blocks' Cayley rotations, float32."""
        q = self.blocks.to(device, torch.float32)
        q = q - q.transpose(-1, -2)
        limit = (self.alpha or 0.0) * self.rows
        norm = torch.linalg.norm(q)
        if self.always_constrained:  # (kohya's form of the same limit)
            q = q * ((torch.clamp(norm, max=limit) + 1e-8) / (norm + 1e-8))
        elif limit > 0 and norm + 1e-8 > limit:
            q = q * (limit / (norm + 1e-8))
        eye = torch.eye(q.shape[-1], device=device)
        return (eye + q) @ torch.linalg.inv(eye - q)

    @property
    def rows(self) -> int:
        return int(self.blocks.shape[-3] * self.blocks.shape[-1])

    def update_of(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 update of ``weight`` at LoRA ``scale`` (the rotations read the weight itself)."""
        self.check(weight.shape)
        w = weight.float()
        r = self._rotations(w.device)
        eye = torch.eye(r.shape[-1], device=w.device)
        turn = scale * (r - eye) + eye  # (the scale moves each rotation toward the identity, as LyCORIS does)
        rest = w.shape[1:]
        if r.dim() == 3:  # diagonal: block k's rows -> turn_k^T @ them
            out = torch.einsum("k n m, k n ... -> k m ...", turn, w.reshape(r.shape[0], r.shape[1], *rest))
        else:
            out = w
            b = r.shape[-1]
            for i in range(r.shape[0]):  # stage i: rows 2^i * b / 2 apart, in blocks of b
                span = 2 ** i * (b // 2)
                out = out.unflatten(0, (-1, 2, span)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
                out = torch.einsum("k i j, k j ... -> k i ...", turn[i], out)
                out = out.flatten(0, 1).unflatten(0, (-1, span, 2)).transpose(1, 2).flatten(0, 2)
        out = out.reshape(w.shape)
        if self.rescale is not None:
            out = out * self.rescale.to(w.device, torch.float32).reshape(-1, *[1] * (w.dim() - 1))
        return out - w


@dataclass
class GLoRALayer:
    """LyCORIS's GLoRA of one layer: ``scale * alpha / rank * (W a1 a2 + b1 b2)``, W the weight, a1 (in, rank) and a2
    (rank, in) acting on its input channels (a convolution's a1 / a2 are 1x1 kernels), b1 (out, rank) and b2 (rank,
    in, k, k) a LoRA, as LyCORIS's forward computes it."""
    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    alpha: Optional[float] = None
    dora_scale = None
    magnitude = None
    KEYS: ClassVar[tuple] = GLORA_KEYS

    @property
    def rank(self) -> int:
        return int(self.a2.shape[0])

    def check(self, shape: torch.Size) -> None:
        if len(shape) < 2:
            raise CheckpointError(f"LyCORIS: GLoRA for a weight of {tuple(shape)}")
        inp, rank = int(shape[1]), self.rank
        want = {"a1": (inp, rank), "a2": (rank, inp), "b1": (int(shape[0]), rank),
                "b2": (rank, math.prod(shape[1:]))}
        for name, expected in want.items():
            t = getattr(self, name)
            found = (int(t.shape[0]), math.prod(t.shape[1:])) if t.dim() >= 2 else tuple(t.shape)
            if found != expected or (name != "b2" and math.prod(t.shape[2:]) != 1):
                raise CheckpointError(f"LyCORIS: GLoRA: {name}.weight {tuple(t.shape)} for a weight of {tuple(shape)} "
                                      f"(expected {expected[0]} x {expected[1]}{' x k x k' if name == 'b2' else ''})")
        if self.b2.dim() > 2 and len(shape) > 2 and tuple(self.b2.shape[1:]) != tuple(shape[1:]):
            raise CheckpointError(f"LyCORIS: GLoRA: b2.weight {tuple(self.b2.shape)} for a weight of {tuple(shape)}")

    def update_of(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 update of ``weight`` at LoRA ``scale`` (its first term reads the weight)."""
        self.check(weight.shape)
        w = weight.float()
        a1, a2 = (t.to(w.device, torch.float32).flatten(1) for t in (self.a1, self.a2))  # (in, rank), (rank, in)
        wa = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i r -> o r ...", w, a1), a2)
        wb = (self.b1.to(w.device, torch.float32).flatten(1) @ self.b2.to(w.device, torch.float32).flatten(1))
        return (wa + wb.reshape(w.shape)) * (_scale(self.alpha, self.rank) * scale)


def lycoris_layer(name: str, keys: dict, alpha: Optional[float], dora_scale: Optional[torch.Tensor] = None):
    """The LoHa, LoKr, full, (IA)^3 or OFT / BOFT layer of kohya module ``name`` from its tensors ``keys`` ({suffix:
    tensor}), or None when it has no kind's keys. (Full and (IA)^3 layers have no alpha: LyCORIS writes none.)"""
    if "w_norm" in keys or "b_norm" in keys:
        if "w_norm" not in keys or dora_scale is not None:
            raise CheckpointError(f"LyCORIS: {name}: a norm layer " + ("without w_norm" if "w_norm" not in keys else
                                                                       "with a dora_scale (LyCORIS trains none)"))
        return NormLayer(keys["w_norm"], keys.get("b_norm"))
    if any(k in keys for k in GLORA_KEYS):
        missing = [k for k in GLORA_KEYS if k not in keys]
        if missing or dora_scale is not None:
            raise CheckpointError(f"LyCORIS: {name}: a GLoRA layer " + (f"without {', '.join(missing)}" if missing
                                                                        else "with a dora_scale (LyCORIS trains none)"))
        return GLoRALayer(*(keys[k] for k in GLORA_KEYS), alpha=alpha)
    if "oft_blocks" in keys:
        if dora_scale is not None:
            raise CheckpointError(f"LyCORIS: {name}: dora_scale beside an OFT layer (LyCORIS trains none)")
        return OFTLayer(keys["oft_blocks"], alpha, keys.get("rescale"))
    if "diff" in keys or "diff_b" in keys or ("weight" in keys and "on_input" in keys):
        if dora_scale is not None:
            raise CheckpointError(f"LyCORIS: {name}: dora_scale beside a full or (IA)^3 layer (LyCORIS trains none)")
        if "on_input" in keys:
            on_input = keys["on_input"]
            if on_input.numel() != 1 or float(on_input) not in (0.0, 1.0):
                raise CheckpointError(f"LyCORIS: {name}.on_input: expected 0 or 1, found {on_input.tolist()}"[:200])
            return IA3Layer(keys["weight"], bool(float(on_input)))
        if "diff" not in keys:
            raise CheckpointError(f"LyCORIS: {name}: a full layer's diff_b without its diff")
        return FullLayer(keys["diff"], keys.get("diff_b"))
    if any(k in keys for k in LOHA_KEYS):
        missing = [k for k in LOHA_KEYS[:4] if k not in keys]
        if missing:
            raise CheckpointError(f"LyCORIS: {name}: a LoHa layer without {', '.join(missing)}")
        return LoHaLayer(*(keys[k] for k in LOHA_KEYS[:4]), t1=keys.get("hada_t1"), t2=keys.get("hada_t2"),
                         alpha=alpha, dora_scale=dora_scale)
    if any(k in keys for k in LOKR_KEYS):
        layer = LoKrLayer(**{k[len("lokr_"):]: keys.get(k) for k in LOKR_KEYS}, alpha=alpha, dora_scale=dora_scale)
        try:  # (a half missing is the file's fault: said where it is read)
            layer._halves_given()
        except CheckpointError as e:
            raise CheckpointError(f"{e} ({name})") from None
        return layer
    return None


__all__ = ["LoHaLayer", "LoKrLayer", "FullLayer", "NormLayer", "IA3Layer", "OFTLayer", "GLoRALayer", "lycoris_layer",
           "dora_axis", "dora_merged", "LOHA_KEYS", "LOKR_KEYS", "FULL_KEYS", "NORM_KEYS", "IA3_KEYS", "OFT_KEYS",
           "GLORA_KEYS"]
