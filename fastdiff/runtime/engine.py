"""The batching Engine: many small requests in, few batched ``pipe.generate`` calls out.

An application loads a model once and serves many single-sample requests, each with its own seed::

    with fastdiff.Engine(pipe, max_batch=8, max_wait_ms=5) as engine:
        fut = engine.submit(seed=42, steps=20, sampler="dpmpp_2m")      # concurrent.futures.Future
        img = fut.result()                                              # (C, H, W) float32
        img = await engine.agenerate(seed=7, steps=20)                  # from asyncio code

How it works. ``submit`` validates what is cheap to validate, puts the request on a queue and returns
a Future. One worker thread groups *compatible* requests (see ``requests.group_key``: same resolution, steps,
sampler, schedule, guided or not, and the same kind/shape of conditioning) into one batch of at most
``max_batch`` and calls ``pipe.generate(seeds=[...], ...)`` once for the whole batch.

Why batching does not change the images: ``Pipeline.generate`` draws every random number from one
generator per sample (``fastdiff.noise.NoiseSource``), so the sample for a seed is the same whatever
else is in the batch. The Engine's part of that guarantee is to batch only requests whose every
other parameter is identical, and to hand row i of the output back to request i.

Scheduling policy. A group is *ready* when it holds ``max_batch`` requests, when its oldest request
has waited ``max_wait_ms``, or when the engine is closing (draining needs no more waiting). Among the
ready groups, the one holding the oldest request goes first (FIFO across groups; FIFO within a
group). The worker never sits idle while a full batch is ready, and a lone request waits at most
``max_wait_ms`` (plus whatever batch is already running) before it is started.

Failure isolation. Requests are validated at ``submit`` where that is cheap (types, steps >= 1, the seed's
range, a class label within the model's, a known sampler / schedule name, conditioning rank); such a request
gets a Future that has already failed with ``BadArgumentError``. When a batched ``generate`` raises
(something only the pipeline can see, e.g. a wrong text width), the batch is split in halves and each half
re-run, down to single requests, so only the bad ones fail, each with the error ``generate`` raised for it:
one bad request in a batch of 8 costs 6 more ``generate`` calls (each a half of a failing part), not 8.

Tensors given to ``submit`` (text states, pooled embeddings, ids) are copied there: a caller may reuse its
buffers for the next request at once, without changing the requests already queued.

Shutdown. ``close()`` (or leaving the ``with`` block) finishes everything queued; ``close(
cancel_pending=True)`` cancels what has not started (those Futures raise ``CancelledError``) and waits
only for the batch already running. ``submit`` after ``close`` raises ``EngineClosedError`` (a
``FastdiffError`` and a ``RuntimeError``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import math
import numbers
import threading
import time
from typing import Dict, List, Optional

import torch

from ..errors import BadArgumentError, FastdiffError
from ..pipeline import check_seed
from ..prompts.encoder import EXTRA_PROMPTS
from ..utils.checks import finite_number
from .requests import (NO_KEY, Request, as_int, check_name, check_row, check_states, classifier_scales_of, group_key,
                       option_key, own_copy, own_option, rescales_of)

__all__ = ["Engine", "EngineClosedError"]

# generate() keywords the Engine owns (per-request values are passed as lists / stacked tensors).
_GENERATE_OWN = frozenset({"n", "seed", "seeds", "latents", "class_labels", "output_type", "progress", "callback"})

# Latencies kept for the percentiles in ``stats()`` (a sliding window, so memory stays bounded).
_LATENCY_WINDOW = 10_000


class EngineClosedError(FastdiffError, RuntimeError):
    """``submit`` was called on an Engine that is closed (or closing)."""


# per-request conditioning beyond the text states (SDXL's pooled text and ids, SD3's / Flux's pooled text, Flux dev's
# guidance): one 1-d row each, stacked into (B, ...) per batch
_ADDED_INPUTS = ("text_embeds", "negative_text_embeds", "time_ids", "negative_time_ids", "guidance")


def _cancel_submitted(submitting: "asyncio.Future") -> None:
    """Cancel the request behind an ``asubmit`` whose caller gave up while ``submit`` still ran in the executor."""
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result().cancel()  # not started yet: the worker drops it; started: it finishes, unread


def _percentile(sorted_values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


# --------------------------------------------------------------------------------------------------
# The Engine
# --------------------------------------------------------------------------------------------------

class Engine:
    """Batches single-sample requests into ``pipe.generate`` calls on one worker thread.

    Args:
        pipe: anything with ``generate(seeds=[...], steps=, sampler=, schedule=, cfg_scale=[...],
            class_labels=, encoder_hidden_states=, negative_encoder_hidden_states=, height=, width=,
            output_type="tensor", progress=False) -> (B, C, H, W)`` whose sample i depends on row i of its
            inputs only (seeds[i], cfg_scale[i], ...: ``fastdiff.Pipeline`` does).
        max_batch: the most requests one ``generate`` call serves.
        max_wait_ms: how long the first request of a group may wait for company before its batch is
            started anyway. 0 = never wait (batch only what is already queued).
        name: the worker thread's name.
        decode: resolve each request to its decoded image (3, H, W) in [-1, 1] (``pipe.decode``, a latent model
            with a VAE decoder), decoded with the rest of its batch; default: the sample itself.
    """

    def __init__(self, pipe, max_batch: int = 8, max_wait_ms: float = 5.0, *, name: str = "fastdiff-engine",
                 decode: bool = False):
        if not callable(getattr(pipe, "generate", None)):
            raise BadArgumentError(f"pipe: expected an object with a generate() method (a fastdiff.Pipeline), "
                                   f"found {type(pipe).__name__}")
        if decode and getattr(pipe, "vae", None) is None:
            raise BadArgumentError("decode=True: this pipeline has no VAE decoder (fastdiff.load(..., vae=...))")
        self.decode = bool(decode)
        self.pipe = pipe
        self.max_batch = as_int("max_batch", max_batch, minimum=1)
        if (isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, numbers.Real)
                or not math.isfinite(max_wait_ms) or max_wait_ms < 0):
            raise BadArgumentError(f"max_wait_ms: expected a finite number >= 0, found {max_wait_ms!r}")
        self.max_wait_ms = float(max_wait_ms)
        size = getattr(getattr(pipe, "spec", None), "sample_size", None)
        self._default_hw = tuple(int(v) for v in size) if isinstance(size, (tuple, list)) and len(size) == 2 else None
        # generate's keywords whose default is None: such an option given as None is the default, and batches with
        # requests that leave it out
        try:
            params = inspect.signature(pipe.generate).parameters.values()
        except (TypeError, ValueError, AttributeError):
            params = ()
        self._none_defaults = frozenset(p.name for p in params if p.default is None)

        self._cv = threading.Condition()
        # key -> deque of requests (FIFO). A dict keeps insertion order, but the group to run is chosen
        # by the age of its oldest request, not by dict order.
        self._groups: "collections.OrderedDict[tuple, collections.deque]" = collections.OrderedDict()
        self._queued = 0
        self._in_flight = 0
        self._closed = False
        self._cancel = False

        self._submitted = 0
        self._rejected = 0      # failed at submit (validation); also counted in _failed
        self._completed = 0
        self._failed = 0        # every Future that ended in an exception
        self._cancelled = 0
        self._batches = 0
        self._retries = 0       # generate calls re-run on a part of a batch that failed
        self._hist: Dict[int, int] = collections.Counter()
        self._latencies = collections.deque(maxlen=_LATENCY_WINDOW)

        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------ API

    def submit(self, seed: int, class_label: Optional[int] = None,
               encoder_hidden_states: Optional[torch.Tensor] = None,
               negative_encoder_hidden_states: Optional[torch.Tensor] = None, steps: int = 20,
               sampler=None, cfg_scale: float = 1.0, height: Optional[int] = None, width: Optional[int] = None,
               schedule=None, text_embeds=None, negative_text_embeds=None, time_ids=None, negative_time_ids=None,
               guidance=None, prompt: Optional[str] = None, negative_prompt: Optional[str] = None,
               image=None, strength: Optional[float] = None, mask_image=None, control_image=None,
               control_mask=None, guidance_rescale: Optional[float] = None, classifier_scale: Optional[float] = None,
               **options) -> concurrent.futures.Future:
        """Queue one sample; the Future resolves to a (C, H, W) tensor.

        Thread-safe. Defaults are ``Pipeline.generate``'s (``sampler=None`` / ``schedule=None``: the
        model's own). ``encoder_hidden_states`` is this request's (M, D) slice; the Engine stacks them.
        ``text_embeds`` / ``time_ids`` (and negatives): an SDXL-style model's pooled text embedding (P,) and
        micro-conditioning ids (N,) of this request, stacked the same way (``Pipeline.generate`` defaults the ids);
        ``guidance``: a guidance-distilled model's strength (Flux dev) for this request, batched per row.
        ``prompt`` / ``negative_prompt``: text in place of those tensors, encoded here, in the caller's thread, by
        the pipeline's text encoders (``Pipeline.encode_prompt``); ``clip_skip`` / ``max_sequence_length`` and the
        second / third encoders' texts (``prompt_2`` / ``prompt_3`` and their ``negative_`` forms, one string each)
        go in ``options``.
        ``image`` / ``strength``: image-to-image (``Pipeline.generate(image=...)``), one image per request, checked
        and converted here; requests of one strength and size batch together, each with its own image.
        ``mask_image``: an inpainting network's mask of this request (``Pipeline.generate(mask_image=...)``), with its
        image. On a super-resolution model (``spec.low_res_channels``) ``image`` is the low-resolution image to
        upsample (the size defaults to generate's: 4x it, or for Stable Diffusion's x4 upscaler latents of its size);
        guided-diffusion upsampler requests of one output size batch together whatever their images' sizes (each is
        upsampled here), the upscaler's of one image size; its ``noise_level`` goes in ``options``.
        ``control_image``: this request's ControlNet image, for a pipeline with a ControlNet (``set_controlnet``); it
        fixes the size; ``control_mask``: an SD3 inpainting ControlNet's mask of this request. The ControlNet's other
        options (``controlnet_conditioning_scale``, ``guess_mode``, ...) go in ``options``.
        ``guidance_rescale``: this request's (``Pipeline.generate``'s, per sample): requests of different values
        share a batch, as of different ``cfg_scale``.
        ``classifier_scale``: this request's classifier guidance strength, with a classifier loaded
        (``Pipeline.load_classifier``; None: the pipeline's), per sample as ``cfg_scale``: requests of different values
        share a batch.
        ``options``: further ``generate`` keywords shared by a batch (sampler options such as ``eta``, ...); values
        must be hashable, and only requests with equal options batch.
        A request that fails validation returns an already failed Future (the error is
        ``BadArgumentError``, or whatever its text encoders raised); only a closed engine makes ``submit`` itself
        raise (``EngineClosedError``).
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            if options.get("padding_mask_crop") is not None:
                raise BadArgumentError("padding_mask_crop: not through the Engine, whose requests resolve to (C, H, W) "
                                       "tensors, while the crop is pasted back into a PIL image; call "
                                       "pipe.generate(..., padding_mask_crop=..., output_type='pil')")
            extra_prompts = {k: options.pop(k) for k in EXTRA_PROMPTS if k in options}  # (never batch options)
            extra_prompts = {k: v for k, v in extra_prompts.items() if v is not None}
            text_options = [k for k in ("clip_skip", "max_sequence_length") if options.get(k) is not None]
            text_options += list(extra_prompts)
            if text_options and prompt is None:  # (they shape a prompt's encoding: alone, they would fail the batch)
                raise BadArgumentError(f"{' / '.join(text_options)}: given without prompt=; they apply to encoding it")
            if prompt is not None or negative_prompt is not None:
                text = self._encode_prompt(prompt, negative_prompt, cfg_scale, sampler, options, extra_prompts,
                                           dict(encoder_hidden_states=encoder_hidden_states, text_embeds=text_embeds,
                                                negative_encoder_hidden_states=negative_encoder_hidden_states,
                                                negative_text_embeds=negative_text_embeds))
                encoder_hidden_states = text["encoder_hidden_states"]
                negative_encoder_hidden_states = text.get("negative_encoder_hidden_states")
                text_embeds, negative_text_embeds = text.get("text_embeds"), text.get("negative_text_embeds")
            image_rows = None
            control_format = getattr(self.pipe, "_control_format", None)
            if control_image is not None or (control_format is not None and control_format() is not None):
                image_rows, height, width = self._control_request(control_image, control_mask, options, height,
                                                                  width)
            elif control_mask is not None:
                raise BadArgumentError("control_mask: given without control_image (an SD3 inpainting ControlNet's "
                                       "mask of its control image)")
            inpainting = getattr(getattr(self.pipe, "spec", None), "inpainting", False)  # (needs image and mask)
            if getattr(getattr(self.pipe, "spec", None), "low_res_channels", None):  # a super-resolution model's
                low_res = self.pipe._low_res_images(image, strength, mask_image)  # image to upsample (any size)
                if low_res.shape[0] != 1:
                    raise BadArgumentError(f"image: expected one image per request, found {low_res.shape[0]}")
                self.pipe._noise_level(options.get("noise_level"), class_label)  # (checked here: one request fails)
                if height is None and width is None:  # (generate's default size)
                    f = self.pipe.spec.low_res_upscale
                    height, width = f * low_res.shape[2], f * low_res.shape[3]
                if self.pipe.spec.low_res_noise is None:  # guided-diffusion's upsamplers: the image upsampled here to
                    # the output size (generate's bilinear resize then keeps it), so that images of any size batch
                    height, width = self.pipe._size(height, width)
                    low_res = torch.nn.functional.interpolate(low_res, size=(height, width), mode="bilinear")
                image_rows = {**(image_rows or {}), "image": low_res[0].clone()}
            elif image is not None or strength is not None or mask_image is not None or inpainting:
                rows, strength, height, width = self._image_request(image, strength, mask_image, steps, height, width,
                                                                    options.get("denoising_start") is not None,
                                                                    sampler, schedule)
                image_rows = {**(image_rows or {}), **rows}
                if strength is not None:
                    options = {**options, "strength": strength}  # (shared by a batch: its grid starts there)
            added = dict(text_embeds=text_embeds, negative_text_embeds=negative_text_embeds, time_ids=time_ids,
                         negative_time_ids=negative_time_ids,
                         guidance=None if guidance is None else [finite_number("guidance", guidance)])
            req = self._make_request(fut, seed, class_label, encoder_hidden_states, negative_encoder_hidden_states,
                                     steps, sampler, cfg_scale, height, width, schedule, options, added, image_rows,
                                     guidance_rescale, classifier_scale)
        except Exception as e:  # a bad request (or a prompt its text encoders could not encode) fails alone
            with self._cv:
                if self._closed:
                    raise EngineClosedError("Engine is closed: submit() after close()") from None
                self._submitted += 1
                self._rejected += 1
                self._failed += 1
            fut.set_running_or_notify_cancel()
            fut.set_exception(e)
            return fut
        with self._cv:
            if self._closed:
                raise EngineClosedError("Engine is closed: submit() after close()")
            self._groups.setdefault(req.key, collections.deque()).append(req)
            self._queued += 1
            self._submitted += 1
            self._cv.notify_all()
        key = req.key  # (the callback holds no request: a Future keeps its callbacks, and a request its Future)
        fut.add_done_callback(lambda f: self._withdraw_if_cancelled(key, f))
        return fut

    def _withdraw_if_cancelled(self, key: tuple, fut: concurrent.futures.Future) -> None:
        """A Future its caller cancelled while queued leaves the queue at once (queue depth and counters exact; the
        worker never sees it). One the worker already took is counted by the worker instead."""
        if not fut.cancelled():
            return
        with self._cv:
            q = self._groups.get(key)
            i = next((i for i, x in enumerate(q or ()) if x.future is fut), None)
            if i is None:
                return
            del q[i]
            if not q:
                del self._groups[key]
            self._queued -= 1
            self._cancelled += 1
            self._cv.notify_all()
        # cancel() alone wakes result() but not concurrent.futures.wait() / as_completed(): what takes a request off
        # the queue notifies those too (the worker does it for those it takes)
        fut.set_running_or_notify_cancel()

    def _image_request(self, image, strength, mask_image, steps, height, width, refines: bool = False,
                       sampler=None, schedule=None):
        """One request's rows for generate(): its image (C, H, W) in [0, 1] (or latents, as generate() takes them),
        and its mask (1, H, W) when it inpaints; its strength (the model's default for None, so that both batch
        together; None for a refiner run, ``refines``, which denoising_start places) and the latent size it fixes; a
        strength that leaves no step of the run's grid fails now (a grid may hold other than ``steps`` steps:
        ComfyUI's ddim_uniform / beta schedules)."""
        pipe = self.pipe
        images, given_latents = pipe._img2img_images(image, strength, None)  # (k, C, H, W)
        masks = pipe._inpaint_masks(mask_image, images, given_latents, refiner=refines)  # (k, 1, H, W) or None
        for name, rows in (("image", images), ("mask_image", masks)):
            if rows is not None and rows.shape[0] != 1:
                raise BadArgumentError(f"{name}: expected one {name.split('_')[-1]} per request, found {rows.shape[0]}")
        _, height, width = pipe._img2img_size(images, 1, height, width, given_latents)
        if not refines:
            grid_steps = pipe.plan(as_int("steps", steps, minimum=1), sampler, schedule, size=(height, width)).steps
            strength, _ = pipe._img2img_strength(strength, grid_steps, inpaints=masks is not None)
        rows = {"image": images[0].clone()}
        if masks is not None:
            rows["mask_image"] = masks[0].clone()
        return rows, strength, height, width

    def _control_request(self, control_image, control_mask, options: dict, height, width):
        """One request's ControlNet image row (C, H, W) in [0, 1] (and an SD3 inpainting ControlNet's mask row
        (1, H, W)), its options checked, and the latent size it fixes."""
        pipe = self.pipe
        control = pipe._control_images(control_image, options.get("controlnet_conditioning_scale"),
                                       options.get("control_guidance_start", 0.0),
                                       options.get("control_guidance_end", 1.0), options.get("guess_mode", False))
        if control.shape[0] != 1:
            raise BadArgumentError(f"control_image: expected one image per request, found {control.shape[0]}")
        height, width = pipe._control_size(control, height, width)
        rows = {"control_image": control[0].clone()}
        masks = pipe._control_masks(control_mask, control)
        if masks is not None:
            if masks.shape[0] != 1:
                raise BadArgumentError(f"control_mask: expected one mask per request, found {masks.shape[0]}")
            rows["control_mask"] = masks[0].clone()
        return rows, height, width

    def _guides(self, sampler, cfg_scale: float) -> bool:
        """Whether generate() makes the unconditional pass for a request (``Pipeline.guides``: cfg != 1, or a CFG++
        sampler where the model has an unconditional input); a pipe without that rule: cfg != 1."""
        guides = getattr(self.pipe, "guides", None)
        return guides(sampler, cfg_scale) if guides is not None else cfg_scale != 1.0

    def _encode_prompt(self, prompt, negative_prompt, cfg_scale, sampler, options: dict, extra_prompts: dict,
                       given: dict) -> dict:
        """One request's text tensors (rows, as submit takes them) from its prompt."""
        if prompt is None or not isinstance(prompt, str):
            raise BadArgumentError(f"prompt: expected one string per request (negative_prompt only with it), found "
                                   f"{prompt!r}")
        for name, text in (("negative_prompt", negative_prompt), *extra_prompts.items()):
            if text is not None and not isinstance(text, str):
                raise BadArgumentError(f"{name}: expected one string per request, found {text!r}")
        stray = sorted(k for k, v in given.items() if v is not None)
        if stray:
            raise BadArgumentError(f"prompt: expected a prompt or encoded text, not both; found prompt and {stray}")
        guided = self._guides(sampler, finite_number("cfg_scale", cfg_scale))
        text = self.pipe.encode_prompt(prompt, negative_prompt, guided=guided, clip_skip=options.pop("clip_skip", None),
                                       max_sequence_length=options.pop("max_sequence_length", None), **extra_prompts)
        return {k: v[0] for k, v in text.items()}

    def asubmit(self, **kwargs) -> "asyncio.Future":
        """``submit`` for asyncio code: an ``asyncio.Future`` bound to the running loop (call it from a coroutine).

        Cancelling the asyncio Future cancels the request if it has not started yet. A request with a prompt is
        submitted from a worker thread: encoding it (and the text encoders' first load) never blocks the loop.
        """
        if kwargs.get("prompt") is None and kwargs.get("negative_prompt") is None:
            return asyncio.wrap_future(self.submit(**kwargs))

        async def submit_off_loop():
            submitting = asyncio.get_running_loop().run_in_executor(None, lambda: self.submit(**kwargs))
            try:
                # shielded: a cancel while the prompt is encoding must not orphan the request submit() then queues
                request = await asyncio.shield(submitting)
            except asyncio.CancelledError:
                submitting.add_done_callback(_cancel_submitted)
                raise
            return await asyncio.wrap_future(request)
        return asyncio.ensure_future(submit_off_loop())

    async def agenerate(self, **kwargs) -> torch.Tensor:
        """``await engine.agenerate(seed=..., ...)`` -> (C, H, W); the event loop is never blocked."""
        return await self.asubmit(**kwargs)

    def close(self, cancel_pending: bool = False, timeout: Optional[float] = None) -> None:
        """Stop accepting requests; finish the queued ones (default) or cancel them, then stop the worker.

        ``cancel_pending=True`` cancels every request not yet started (its Future raises
        ``CancelledError``); the batch already running is allowed to finish. Idempotent. ``timeout``
        bounds the wait for the worker (None: wait until it is done).
        """
        to_cancel: List[Request] = []
        with self._cv:
            self._closed = True
            if cancel_pending:
                self._cancel = True
                for q in self._groups.values():
                    to_cancel.extend(q)
                self._groups.clear()
                self._queued = 0
            self._cv.notify_all()
        n = 0
        for r in to_cancel:
            if r.future.cancel():  # (wait() / as_completed() need the notify too, see _withdraw_if_cancelled)
                r.future.set_running_or_notify_cancel()
                n += 1
        if n:
            with self._cv:
                self._cancelled += n
        if threading.current_thread() is not self._worker:  # close() from a done-callback must not self-join
            self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving on an exception cancels what is queued rather than computing results nobody awaits.
        self.close(cancel_pending=exc_type is not None)

    def stats(self) -> dict:
        """A snapshot: queue depth, counters, batch-size histogram, latency percentiles (ms, submit -> result).

        Once idle, ``submitted == completed + failed + cancelled`` (``rejected``: the part of ``failed``
        refused at submit; ``in_flight``: requests taken by the worker, not yet resolved). ``batches`` counts
        ``generate`` calls, re-runs included (``retries``: those on a half of a failed batch).
        Latency percentiles are over the last 10,000 successful requests; None before the first.
        """
        with self._cv:
            lat = sorted(self._latencies)
            out = {
                "queue_depth": self._queued,
                "in_flight": self._in_flight,
                "groups_waiting": sum(1 for q in self._groups.values() if q),
                "submitted": self._submitted,
                "completed": self._completed,
                "failed": self._failed,
                "rejected": self._rejected,
                "cancelled": self._cancelled,
                "batches": self._batches,
                "retries": self._retries,
                "batch_size_hist": dict(sorted(self._hist.items())),
                "closed": self._closed,
            }
        out["latency_ms"] = {
            "p50": _percentile(lat, 50), "p90": _percentile(lat, 90), "p99": _percentile(lat, 99),
            "mean": (sum(lat) / len(lat)) if lat else None, "count": len(lat),
        }
        return out

    def __repr__(self) -> str:
        return (f"Engine(max_batch={self.max_batch}, max_wait_ms={self.max_wait_ms}, queued={self._queued}, "
                f"closed={self._closed})")

    # ------------------------------------------------------------------------------------ internals

    def _make_request(self, fut, seed, class_label, ehs, nehs, steps, sampler, cfg_scale, height, width,
                      schedule, options, added, image_rows=None, guidance_rescale=None,
                      classifier_scale=None) -> Request:
        seed = check_seed(as_int("seed", seed))  # what Pipeline.generate takes
        class_label = as_int("class_label", class_label, minimum=0, allow_none=True)
        top = getattr(getattr(self.pipe, "spec", None), "label_bound", None)  # None: generate() checks it
        if class_label is not None and isinstance(top, int) and class_label >= top:
            raise BadArgumentError(f"class_label: expected a label in [0, {top - 1}] for this model, found "
                                   f"{class_label}")
        steps = as_int("steps", steps, minimum=1)
        height = as_int("height", height, minimum=1, allow_none=True)
        width = as_int("width", width, minimum=1, allow_none=True)
        if self._default_hw is not None:
            # None means the model's size: spell it out so that "None" and "16" requests batch together.
            height = self._default_hw[0] if height is None else height
            width = self._default_hw[1] if width is None else width
        options = {k: v for k, v in options.items() if not (v is None and k in self._none_defaults)}
        reserved = sorted(set(options) & _GENERATE_OWN)
        if reserved:
            raise BadArgumentError(f"submit: {reserved} cannot be set per request (the Engine sets them)")
        # (tensors and arrays copied: the caller may reuse its buffer once submit returns; keyed by value, so equal
        # ones made apart batch together)
        options = tuple(sorted((k, own_option(v)) for k, v in options.items()))
        options_key = tuple((k, option_key(v)) for k, v in options)
        bad = [k for (k, v), (_, key) in zip(options, options_key) if key is NO_KEY]
        if bad:
            raise BadArgumentError(f"submit options: expected hashable values (or tensors, arrays, lists of them), "
                                   f"found {', '.join(f'{k}={dict(options)[k]!r}' for k in bad)}")
        cfg_scale = finite_number("cfg_scale", cfg_scale)
        if guidance_rescale is not None:
            guidance_rescale = finite_number("guidance_rescale", guidance_rescale)
        if classifier_scale is not None:
            classifier_scale = finite_number("classifier_scale", classifier_scale)
            if getattr(self.pipe, "classifier", None) is None:
                raise BadArgumentError("classifier_scale: no classifier is loaded (pipe.load_classifier)")
        sampler = check_name("sampler", sampler, "fastdiff.samplers", "SAMPLERS")
        schedule = check_name("schedule", schedule, "fastdiff.schedules", "SCHEDULES")
        ehs = own_copy(check_states("encoder_hidden_states", ehs))
        nehs = own_copy(check_states("negative_encoder_hidden_states", nehs))
        if nehs is not None:
            if ehs is None:
                raise BadArgumentError("negative_encoder_hidden_states: given without encoder_hidden_states")
            if nehs.shape != ehs.shape:
                raise BadArgumentError(f"negative_encoder_hidden_states: expected the shape of encoder_hidden_states "
                                       f"{tuple(ehs.shape)}, found {tuple(nehs.shape)}")
        guided = self._guides(sampler, cfg_scale)  # (requests that differ there never share a batch)
        params = dict(steps=steps, sampler=sampler, schedule=schedule, height=height,
                      width=width, options=options, options_key=options_key, guided=guided)
        added = {k: own_copy(check_row(k, v)) for k, v in added.items() if v is not None}
        if image_rows is not None:  # (C, H, W) each, stacked into generate(image=(B, C, H, W)) like the rows above
            added.update(image_rows)
        req = Request(seed, class_label, ehs, nehs, cfg_scale, params, added, (), fut, guidance_rescale,
                      classifier_scale)
        req.key = group_key(req)
        return req

    def _next_batch(self) -> Optional[List[Request]]:
        """Block until a batch is ready (see the module docstring) and pop it; None when it is time to stop."""
        with self._cv:
            while True:
                if self._cancel or (self._closed and self._queued == 0):
                    return None
                now = time.perf_counter()
                wait_s = self.max_wait_ms / 1000.0
                best_key, best_t, next_deadline = None, None, None
                for key, q in self._groups.items():
                    t0 = q[0].t_submit
                    ready = self._closed or len(q) >= self.max_batch or now - t0 >= wait_s
                    if ready:
                        if best_t is None or t0 < best_t:
                            best_key, best_t = key, t0
                    else:
                        d = t0 + wait_s
                        next_deadline = d if next_deadline is None else min(next_deadline, d)
                if best_key is not None:
                    q = self._groups[best_key]
                    batch = [q.popleft() for _ in range(min(self.max_batch, len(q)))]
                    if not q:
                        del self._groups[best_key]
                    self._queued -= len(batch)
                    self._in_flight += len(batch)
                    for r in batch:
                        r.in_flight = True
                    return batch
                self._cv.wait(None if next_deadline is None else max(0.0, next_deadline - now))

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._serve(batch)
            del batch  # an idle worker holds no request of the last batch (their Futures, results, tensors)

    def _serve(self, batch: List[Request]) -> None:
        """Run one batch (its locals, and so its requests, are gone when this returns)."""
        try:
            # A request whose Future was cancelled while queued is dropped here.
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            with self._cv:
                self._cancelled += len(batch) - len(live)
                for r in batch:
                    if r.future.cancelled():
                        self._release(r)
            if live:
                self._run_batch(live)
        except BaseException as e:  # a bug here must fail the futures, never hang their owners
            for r in batch:
                if not r.future.done():
                    self._finish(r, exc=e)
        finally:  # normally each request was released as it resolved; this only catches a bug's leftovers
            with self._cv:
                for r in batch:
                    self._release(r)

    def _release(self, r: Request) -> None:
        """Stop counting ``r`` as in flight (once; the caller holds ``self._cv``)."""
        if r.in_flight:
            r.in_flight = False
            self._in_flight -= 1

    def _generate(self, reqs: List[Request]) -> torch.Tensor:
        p = reqs[0].params
        labels = None if reqs[0].class_label is None else [r.class_label for r in reqs]
        ehs = None if reqs[0].encoder_hidden_states is None else torch.stack([r.encoder_hidden_states for r in reqs])
        nehs = (None if reqs[0].negative_encoder_hidden_states is None
                else torch.stack([r.negative_encoder_hidden_states for r in reqs]))
        out = self.pipe.generate(
            seeds=[r.seed for r in reqs], steps=p["steps"], sampler=p["sampler"], schedule=p["schedule"],
            cfg_scale=[r.cfg_scale for r in reqs], class_labels=labels, encoder_hidden_states=ehs,
            negative_encoder_hidden_states=nehs, height=p["height"], width=p["width"], output_type="tensor",
            progress=False, **{k: torch.stack([r.added[k] for r in reqs]) for k in reqs[0].added},
            **rescales_of(reqs), **classifier_scales_of(reqs, self.pipe), **dict(p["options"]))
        if not torch.is_tensor(out) or out.dim() < 1 or out.shape[0] != len(reqs):
            found = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise FastdiffError(f"pipe.generate: expected a tensor with {len(reqs)} samples on dim 0, found {found}")
        if self.decode:
            out = self.pipe.decode(out)  # (B, 3, H, W): the batch's images at once
        return out

    def _run_batch(self, reqs: List[Request]) -> None:
        with self._cv:
            self._batches += 1
            self._hist[len(reqs)] += 1
        try:
            out = self._generate(reqs)
        except Exception as e:
            if len(reqs) == 1:
                self._finish(reqs[0], exc=e)
                return
            # Someone in this batch is bad (or the batch as a whole failed): re-run each half, down to single
            # requests, so that only the requests that fail on their own get an error (a bad request costs about
            # 2 * log2(batch) calls, not one per request).
            half = (len(reqs) + 1) // 2
            for part in (reqs[:half], reqs[half:]):
                with self._cv:
                    self._retries += 1
                self._run_batch(part)
            return
        for i, r in enumerate(reqs):
            # clone: each result owns its memory instead of keeping the whole batch tensor alive.
            self._finish(r, result=out[i].clone())

    def _finish(self, r: Request, result=None, exc: Optional[BaseException] = None) -> None:
        # The counters change before the Future resolves: whoever wakes on result() (or a done-callback) and reads
        # stats() then sees this request finished, not in flight.
        if exc is not None:
            with self._cv:
                self._failed += 1
                self._release(r)
            r.future.set_exception(exc)
            return
        with self._cv:
            self._completed += 1
            self._release(r)
            self._latencies.append((time.perf_counter() - r.t_submit) * 1000.0)
        r.future.set_result(result)
