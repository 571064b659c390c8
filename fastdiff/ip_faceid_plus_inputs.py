"""``generate``'s image prompt where an IP-Adapter Face ID Plus is loaded (``fastdiff.models.ip_faceid_plus``).

Face ID Plus reads two things per image, and ``generate`` takes both:

- ``ip_adapter_image_embeds``: the face-recognition embedding (insightface's, (D,), (N, D) or (B, N, D); or
  diffusers' form, a list of one tensor per adapter, [negative; positive] stacked on the batch under guidance), as
  plain Face ID takes it; the unconditional pass on zeros where no negative is given (diffusers' Face ID examples);
- the CLIP penultimate hidden states of the face crop, either as ``ip_adapter_image`` (the face image(s), N of them,
  encoded by the pipeline's image encoder as IP-Adapter Plus's are: ``image_encoder_folder`` at load), or as
  ``ip_adapter_clip_embeds`` (precomputed: what diffusers' users set as ``image_projection_layers[i].clip_embeds``,
  (S, E), (N, S, E) or (B, N, S, E); with the embeddings in diffusers' list form under guidance, diffusers' tensor
  itself, negatives first: ``pipe.prepare_ip_adapter_image_embeds([faces], None, device, 1, True)[0]``). The
  unconditional pass reads a black image's hidden states (diffusers' ``encode_image`` of zero pixels) unless
  diffusers' form brings its own.

With several adapters loaded, every adapter's features come through ``ip_adapter_image_embeds`` in diffusers' list
form, and ``ip_adapter_image`` / ``ip_adapter_clip_embeds`` are lists with one entry per adapter: the Face ID Plus
adapters' faces (or states), None for the others. The two parts are packed into one tensor per image
(``fastdiff.models.ip_faceid_plus.pack``), the form the UNet reads.

A mixin of ``IPAdapterMixin`` (``fastdiff.pipeline_ip_adapter``), whose helpers it shares: ``_given_embeds``,
``_with_negative``, ``_encode_ip_image`` and ``_black_image_states``.
"""

from __future__ import annotations

import torch

from .errors import BadArgumentError


class FaceIDPlusInputs:
    """``generate``'s image prompt with a Face ID Plus adapter among those loaded."""

    def _face_id_plus_features(self, image, embeds, clip_embeds, b: int, guided: bool) -> tuple:
        """(positive, negative) (b, N, ...) features of every adapter (a pair of tuples for several), Face ID Plus
        ones packed."""
        from .models.ip_adapter import adapter_count, is_face_id_plus
        from .models.ip_faceid_plus import pack

        count = adapter_count(self.model)
        plus = [is_face_id_plus(p) for p in self.model.ip_projection]
        if embeds is None:
            raise BadArgumentError("ip_adapter_image_embeds: IP-Adapter Face ID Plus reads a face-recognition "
                                   "embedding (insightface's) beside the face crop's CLIP hidden states: expected "
                                   "ip_adapter_image_embeds, and ip_adapter_image or ip_adapter_clip_embeds; found "
                                   "no ip_adapter_image_embeds")
        if (image is None) == (clip_embeds is None):
            raise BadArgumentError(f"ip_adapter_image / ip_adapter_clip_embeds: IP-Adapter Face ID Plus reads the "
                                   f"face crop's CLIP penultimate hidden states: expected one of them (the face "
                                   f"image, encoded here, or its states), found "
                                   f"{'both' if image is not None else 'neither'}")
        listed = isinstance(embeds, (list, tuple))
        pairs = self._given_embeds(embeds, count, guided)
        given = _per_adapter_entries("ip_adapter_image" if image is not None else "ip_adapter_clip_embeds",
                                     image if image is not None else clip_embeds, plus)
        out = []
        for i, ((positive, negative), entry) in enumerate(zip(pairs, given)):
            positive, negative = self._with_negative(i, positive, negative, b, guided)  # (b, N, D) each
            if not plus[i]:
                out.append((positive, negative))
                continue
            if image is not None:
                states, black = (e[None] for e in self._encode_ip_image(entry, i))  # (1, N, S, E) each
            else:
                states, black = self._face_crop_states(entry, i, listed and guided)
            states = self._face_states_per_sample(states, b, positive.shape[1], i)
            if black is None:  # (the unconditional pass's: a black image's; unread without guidance)
                black = (self._black_image_states()[None, None].expand(1, states.shape[1], -1, -1) if guided
                         else torch.zeros_like(states))
            black = self._face_states_per_sample(black, b, positive.shape[1], i)
            out.append((pack(positive, states), pack(negative, black)))
        return self._per_adapter_result(out)

    @staticmethod
    def _per_adapter_result(both: list) -> tuple:
        """(positive, negative) per adapter -> one adapter's pair, or (positives, negatives) tuples of several."""
        if len(both) == 1:
            return both[0]
        return tuple(p for p, _ in both), tuple(n for _, n in both)

    def _face_crop_states(self, states, adapter: int, stacked: bool) -> tuple:
        """(positive, negative or None) of ip_adapter_clip_embeds, (B or 1, N, S, E); ``stacked``: diffusers' tensor,
        [negative; positive] on the batch."""
        which = f" for IP-Adapter {adapter}" if len(self.model.ip_projection) > 1 else ""
        if not torch.is_tensor(states) or not 2 <= states.dim() <= 4 or not states.is_floating_point():
            raise BadArgumentError(f"ip_adapter_clip_embeds: expected a float tensor (S, E), (N, S, E) or "
                                   f"(B, N, S, E) of the face crop's CLIP hidden states{which}, found "
                                   f"{tuple(states.shape) if torch.is_tensor(states) else type(states).__name__}")
        if not torch.isfinite(states).all():
            raise BadArgumentError("ip_adapter_clip_embeds: expected finite values, found NaN or inf")
        if not stacked:
            return states.reshape((1,) * (4 - states.dim()) + tuple(states.shape)), None
        if states.dim() != 4 or states.shape[0] % 2:
            raise BadArgumentError(f"ip_adapter_clip_embeds: with guidance and ip_adapter_image_embeds in diffusers' "
                                   f"list form, diffusers' clip_embeds stack the negative and positive states: "
                                   f"expected (2B, N, S, E){which}, found {tuple(states.shape)}")
        negative, positive = states.chunk(2)
        return positive, negative

    def _face_states_per_sample(self, states: torch.Tensor, b: int, images: int, adapter: int) -> torch.Tensor:
        """(B or 1, N or 1, S, E) hidden states as (b, N, S, E) float32 on the pipeline's device, checked against the
        face embeddings' N images and the adapter's width."""
        width = self.model.ip_projection[adapter].clip_dim
        if states.shape[0] not in (1, b) or states.shape[1] != images or states.shape[-1] != width \
                or states.shape[2] == 0:
            raise BadArgumentError(f"ip_adapter_clip_embeds / ip_adapter_image: expected the face crop's CLIP "
                                   f"hidden states as (1 or {b} samples, {images} images (one per face embedding), "
                                   f"S, {width}), found {tuple(states.shape)}")
        return states.to(self.device, torch.float32).expand(b, images, *states.shape[2:])


def _per_adapter_entries(name: str, given, plus: list) -> list:
    """``given`` as one entry per adapter: itself for one adapter; for several, a list of one per adapter, None
    where the adapter is no Face ID Plus."""
    if len(plus) == 1:
        return [given]
    if not isinstance(given, (list, tuple)) or len(given) != len(plus):
        raise BadArgumentError(f"{name}: {len(plus)} IP-Adapters are loaded: expected a list of {len(plus)} (the "
                               f"Face ID Plus adapters' entries, None for the others), found "
                               f"{f'a list of {len(given)}' if isinstance(given, (list, tuple)) else 'one entry'}")
    for i, (entry, is_plus) in enumerate(zip(given, plus)):
        if (entry is None) == is_plus:
            why = "Face ID Plus" if is_plus else "its features come through ip_adapter_image_embeds"
            raise BadArgumentError(f"{name}: expected {'an entry' if is_plus else 'None'} for IP-Adapter {i} ({why}), "
                                   f"found {'none' if entry is None else type(entry).__name__}")
    return list(given)
