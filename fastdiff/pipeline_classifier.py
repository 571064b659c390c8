"""``Pipeline.load_classifier``: classifier guidance with guided-diffusion's noisy-image classifiers, as its
``classifier_sample.py`` (a mixin of ``fastdiff.pipeline.Pipeline``; the guidance itself:
``fastdiff.classifier_guidance``).

A loaded classifier steers every ``generate`` call towards its ``class_labels`` by ``classifier_scale`` (guided-
diffusion's ``--classifier_scale``; the pipeline's default from ``load_classifier(scale=)``). Class-conditional
models read the labels too (ADM's conditional models with their classifier, as the paper's best ImageNet runs); an
unconditional model (``256x256_diffusion_uncond.pt``) gives them to the classifier alone. The classifier is a part of
the pipeline, not of the network: ``save()`` writes the network without it, and ONNX / TensorRT graphs of the network
are guided by the classifier in torch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import BadArgumentError, CheckpointError
from .utils.checks import finite_number, integer_labels


class ClassifierMixin:
    """What ``Pipeline`` needs: ``spec``, ``device``, ``plan``."""

    classifier = None
    classifier_scale = 1.0

    def load_classifier(self, path, *, scale: float = 1.0, head_channels: Optional[int] = None,
                        num_heads: Optional[int] = None, layers_per_block: Optional[int] = None,
                        attention_order: str = "legacy", dtype: Optional[torch.dtype] = None) -> "ClassifierMixin":
        """Load a guided-diffusion classifier (``64x64_classifier.pt`` ... ``512x512_classifier.pt``, or any
        ``EncoderUNetModel`` state dict: a .pt file read with ``torch.load(weights_only=True)``, a .safetensors file,
        or a loaded dict) for classifier guidance at ``scale``. head_channels (default 64, as ADM's
        ``create_classifier``) / num_heads / attention_order: as ``fastdiff.load`` takes them for ADM UNets;
        layers_per_block: ADM's ``classifier_depth`` when the keys leave it open. float32 unless ``dtype``."""
        from .checkpoints import check_load_args
        from .checkpoints.guided_classifier import build_classifier, is_guided_classifier_state_dict

        _, dtype = check_load_args(self.device, dtype, num_heads, head_channels, None)  # (as fastdiff.load checks)
        if layers_per_block is not None and (isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int)
                                             or layers_per_block < 1):
            raise BadArgumentError(f"layers_per_block: expected a positive int, found {layers_per_block!r}")
        state = path if isinstance(path, dict) else _read(path)
        if not is_guided_classifier_state_dict(state):
            raise CheckpointError(f"load_classifier(): expected a guided-diffusion classifier (EncoderUNetModel: "
                                  f"input_blocks, middle_block and an 'out.' head, no output_blocks), found keys "
                                  f"{sorted(state)[:6]}")
        model = build_classifier(state, head_channels=head_channels, num_heads=num_heads,
                                 layers_per_block=layers_per_block, attention_order=attention_order)
        return self.set_classifier(model.to(self.device, dtype or torch.float32), scale=scale)

    def set_classifier(self, classifier, *, scale: float = 1.0) -> "ClassifierMixin":
        """Guide with ``classifier(x_t, t) -> logits (B, classes)`` (an ``ADMClassifier``, or any module of that
        call), at ``scale``; None removes it (``unload_classifier``)."""
        if classifier is None:
            return self.unload_classifier()
        if not callable(classifier):
            raise BadArgumentError(f"set_classifier(): expected a module classifier(x_t, t) -> logits, found "
                                   f"{type(classifier).__name__}")
        if self.spec.kind not in ("unet", "dit") or self.plan(1).denoiser_kind != "discrete":
            raise BadArgumentError(f"set_classifier(): classifier guidance reads a DDPM-schedule network's timesteps, "
                                   f"and this is a {self.spec.kind} model"
                                   + ("" if self.spec.kind not in ("unet", "dit") else
                                      f" sampled in continuous time ({self.spec.prediction_type})"))
        if self.spec.low_res_noise is not None:
            raise BadArgumentError("set_classifier(): an upscaler's class input is its noise level, not a class")
        config = getattr(classifier, "config", None)
        wants = getattr(getattr(config, "encoder", None), "in_channels", None)
        if wants is not None and wants != self.spec.in_channels:
            raise BadArgumentError(f"set_classifier(): the classifier reads {wants}-channel images and this model "
                                   f"samples {self.spec.in_channels} channels")
        if isinstance(classifier, torch.nn.Module):
            classifier.eval().requires_grad_(False)  # (the gradient is taken with respect to the image only)
        self.classifier, self.classifier_scale = classifier, _scale(scale)
        return self

    def unload_classifier(self) -> "ClassifierMixin":
        self.classifier, self.classifier_scale = None, 1.0
        return self

    def _classifier_labels(self, class_labels, b: int) -> Optional[tuple]:
        """(the (b,) int64 labels the classifier steers to (generate's ``class_labels``), the largest), or None without
        a classifier; checked against its class count (a classifier without a config: against its logits' width, in
        ``ClassifierGuidance``)."""
        if self.classifier is None:
            return None
        if class_labels is None:
            raise BadArgumentError("class_labels: a classifier is loaded (load_classifier): expected the class of "
                                   "each sample to steer to, found None")
        labels, lo, hi = integer_labels(class_labels, b)
        classes = getattr(getattr(self.classifier, "config", None), "num_classes", None)
        if lo < 0 or (classes is not None and hi >= classes):
            raise BadArgumentError(f"class_labels: expected labels in [0, {classes - 1 if classes else '...'}] (the "
                                   f"classifier's {classes or 'class'} classes), found {lo if lo < 0 else hi}")
        return labels.to(self.device), hi

    def _classifier_guided(self, denoiser, base, steer: Optional[tuple], scales: Optional[list]):
        """``denoiser`` with classifier guidance (``base``: the network's own DiscreteDenoiser, whose timesteps the
        classifier reads; ``steer``: ``_classifier_labels``'; ``scales``: one per sample, None for the pipeline's),
        or as it is without a classifier or at scale 0 everywhere (the unguided run, with no classifier pass)."""
        if steer is None:
            return denoiser
        from .classifier_guidance import ClassifierGuidance, ClassifierGuidedDenoiser

        scales = [self.classifier_scale] * len(steer[0]) if scales is None else scales
        if not any(scales):
            return denoiser
        scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=torch.float32, device=self.device)
        labels, top = steer
        return ClassifierGuidedDenoiser(denoiser, ClassifierGuidance(self.classifier, labels, scale, base,
                                                                     largest_label=top))


def _scale(scale) -> float:
    return finite_number("classifier_scale", scale)


def _read(path) -> dict:
    from .checkpoints.io import pick_state_dict, read_weights

    if not isinstance(path, (str, os.PathLike)):
        raise BadArgumentError(f"load_classifier(): expected a path or a state dict, found {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadArgumentError(f"load_classifier(): expected a classifier file, found no file at {path!r}")
    return pick_state_dict(read_weights(path), source=path)
