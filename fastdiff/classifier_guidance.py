"""Classifier guidance (Dhariwal & Nichol 2021, Algorithms 1 and 2): a noisy-image classifier's gradient steers the
sampling towards a class, as guided-diffusion's ``classifier_sample.py``.

The gradient is guided-diffusion's ``cond_fn``: g = scale * grad_{x_t} log p(y | x_t, t), the classifier fed the
variance-preserving noisy image x_t = x / sqrt(1 + sigma^2) and the network's training timestep t. It enters the
sampling in one of guided-diffusion's two ways:

* ``condition_score`` (Algorithm 2; guided-diffusion's DDIM, and here every sampler but DDPM): eps' = eps -
  sqrt(1 - a) g. In sigma units (x = x0 + sigma eps, sqrt(1 - a) = sigma c_in, c_in = 1 / sqrt(1 + sigma^2)) that is
  x0' = x0 + sigma^2 c_in g, after x0 is clipped where the run clips (guided-diffusion conditions the clipped
  prediction):
  ``ClassifierGuidedDenoiser``, any sampler's denoiser;
* ``condition_mean`` (Algorithm 1; guided-diffusion's ``p_sample``, ``sample_ddpm`` here): the posterior mean moves by
  its variance times g, mean' = mean + var g, on every step, the last one too (where no noise is added):
  ``ClassifierGuidedDenoiser.guidance``, read by ``fastdiff.ddpm.sample_ddpm``.

The classifier runs eagerly with autograd on (a captured sampling loop cannot hold its backward pass); the
denoising network is not differentiated.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .denoiser import DiscreteDenoiser, Denoiser, _bcast, _model_dtype, cached_timesteps
from .errors import BadArgumentError


class ClassifierGuidance:
    """g(x, sigma) = scale * grad log p(labels | x_t, t) with respect to x_t (float32, x's shape).

    Args:
        classifier: ``classifier(x_t, t) -> logits (B, classes)`` (``fastdiff.models.adm_classifier``).
        labels: (B,) int64 classes to steer each sample to.
        scale: guided-diffusion's ``classifier_scale`` (one, or a (B,) tensor: one per sample).
        base: the network's ``DiscreteDenoiser``: the classifier reads the timestep (and the input scaling) the
            network reads.
        largest_label: the largest of ``labels`` when known on the host: checked against the logits' width (a label
            past it would index out of range, on a GPU a device-side assert).
    """

    def __init__(self, classifier, labels: torch.Tensor, scale, base: DiscreteDenoiser,
                 largest_label: Optional[int] = None):
        if not isinstance(base, DiscreteDenoiser):
            raise BadArgumentError(f"classifier guidance: a noisy-image classifier reads a DDPM training timestep, "
                                   f"and this model's denoiser is a {type(base).__name__}; expected a "
                                   f"discrete-time (DDPM-schedule) model such as guided-diffusion's")
        self.classifier, self.labels, self.scale, self.base = classifier, labels, scale, base
        self.largest_label = largest_label
        self._timestep_tensors: dict = {}
        self.dtype = _model_dtype(classifier, None)

    def c_in(self, sigma: float) -> float:
        return self.base._host_coeffs(float(sigma))[1]

    def gradient(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """g at one host sigma (a float) or per-sample sigmas (a (B,) tensor)."""
        if isinstance(sigma, (int, float)):
            t, c_in = self.base._host_coeffs(float(sigma))[:2]
            ts = cached_timesteps(self._timestep_tensors, t, x)
        else:
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
            ts = self.base.sigma_to_t(sigma).to(torch.float32)
            c_in = _bcast((sigma * sigma + 1).rsqrt(), x)
        labels = self.labels.to(x.device)
        if labels.shape != (x.shape[0],):
            raise BadArgumentError(f"classifier guidance: expected {x.shape[0]} labels (one per sample), found "
                                   f"{tuple(labels.shape)}")
        # (under torch.inference_mode a run's tensors are inference tensors, which autograd cannot save: the
        # classifier's pass leaves that mode and works on copies)
        inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False), torch.enable_grad():
            x_t = (x * c_in).to(self.dtype)
            x_t = (x_t.clone() if inference else x_t.detach()).requires_grad_(True)
            if inference:
                ts, labels = ts.clone(), labels.clone()
            logits = self.classifier(x_t, ts)  # (B, classes)
            if self.largest_label is not None and self.largest_label >= logits.shape[-1]:
                raise BadArgumentError(f"class_labels: expected labels in [0, {logits.shape[-1] - 1}] (the "
                                       f"classifier's {logits.shape[-1]} classes), found {self.largest_label}")
            log_probs = F.log_softmax(logits.float(), dim=-1)
            selected = log_probs.gather(1, labels[:, None])  # (B, 1)
            (grad,) = torch.autograd.grad(selected.sum(), x_t)
        scale = self.scale
        if torch.is_tensor(scale):
            scale = _bcast(scale.to(x.device), x)
        return grad.to(x.dtype) * scale


class ClassifierGuidedDenoiser(Denoiser):
    """``inner`` (any fastdiff denoiser: plain, CFG, a ControlNet window) with classifier guidance's
    ``condition_score``: x0' = x0 + sigma^2 c_in g, x0 the inner denoiser's prediction (clipped where it clips).
    DDPM reads ``guidance`` instead and conditions its posterior mean (``condition_mean``)."""

    postprocess_x0 = None  # (the inner denoiser clips; the conditioned x0 is not clipped again, as guided-diffusion)

    def __init__(self, inner: Denoiser, guidance: ClassifierGuidance):
        self.inner, self.guidance = inner, guidance

    def c_skip(self, sigma):
        return self.inner.c_skip(sigma)

    def predict_at(self, x, sigma: float, **cond):
        s = float(sigma)
        x0 = self.inner.denoise_at(x, s, **cond)
        return torch.add(x0, self.guidance.gradient(x, s), alpha=s * s * self.guidance.c_in(s))

    def predict(self, x, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = _bcast(sigma, x)
        return self.inner(x, sigma, **cond) + self.guidance.gradient(x, sigma) * (s * s * (s * s + 1).rsqrt())

    def predict_variance_at(self, x, sigma: float, **cond):
        raise BadArgumentError("classifier guidance: a learned variance is read by DDPM, which conditions its "
                               "posterior mean (read guidance and call the inner denoiser)")


def classifier_guided(denoiser) -> bool:
    """Whether a run's denoiser is classifier-guided (it then runs eagerly: a captured loop holds no backward pass)."""
    return isinstance(denoiser, ClassifierGuidedDenoiser)
