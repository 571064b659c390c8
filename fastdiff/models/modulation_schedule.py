"""Every network call's adaLN modulation of a captured DiT sampling loop, from one matmul before the loop.

With ``fuse_adaln`` a DiT computes each call's modulation as one (N, D) x (D, depth * 6D + 2D) matmul. At
the network batch of a batch-1 guided request (N = 2) that matmul streams all 451 MB of DiT-XL/2's
modulation weights (fp16) for two rows: 108 µs of a 2.0 ms step on an H200 (bench/RESULTS.md, run 3), once
per step. The modulation depends on the timestep and the class label only, and a sampling loop's are known
before it starts, so one (K * N, D) matmul before the loop serves all K calls and streams the weights once.

How a schedule knows the calls: as ``RecordedNoise`` learns a loop's noise draws, a ``ModulationSchedule``
learns its network calls on the loop's warm-up run (``graph_scope="loop"``): the timestep tensor of each.
Those are the denoiser's cached per-sigma tensors (``DiscreteDenoiser.predict_at``), the same objects on
every run. On later runs (the graph's warm-up and capture) the first call computes every call's modulation;
each call then takes its rows. A call whose timestep is not the recorded object (a denoiser that builds its
timesteps per call), a batch other than the recorded one, or more calls than recorded, turns the schedule
off for the rest of that run: such calls compute their own modulation, so a mismatch never gives a wrong
result, only no saving.

The class labels are the first call's: every network call of one sampling loop gets the same conditioning
(the samplers pass ``extra_args`` unchanged from call to call, and a captured loop reads it from static
buffers).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

# the modulation of every call is held for the whole loop: beyond this many bytes the per-call matmul runs
# (DiT-XL/2, 20 calls: 7.8 MB per network-batch row in fp16, so 250 MB for a guided batch of 16)
MAX_BYTES = 256 * 2**20


class ModulationSchedule:
    """The recorded network calls of one sampling loop and, during a run, every call's modulation."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.timesteps: list[torch.Tensor] = []  # one (N,) tensor per network call, learned on the first run
        self.recording = True
        self.unusable = False  # the recording run met a call it cannot schedule: every run computes per call
        self.precomputes = 0  # how many runs computed the modulation in one matmul (tests, benchmarks)
        self._cursor = 0
        self._rows: Optional[torch.Tensor] = None  # (K, N, W) during a run
        self._off = False  # this run met a call that does not match the recording
        self._thread: Optional[int] = None  # the thread running the loop: calls from others are not its calls

    def begin(self) -> None:
        self._cursor, self._rows, self._off = 0, None, self.unusable
        self._thread = threading.get_ident()

    def end(self) -> None:
        # the rows are one run's intermediate (inside a captured graph, the graph's memory holds them)
        self._rows = None
        if self.recording:
            self.recording = False
            self.unusable = self.unusable or not self.timesteps

    def take(self, model, timestep, labels: torch.Tensor) -> Optional[tuple]:
        """This call's per-layer modulation views, or None when the model computes its own."""
        if self._off or threading.get_ident() != self._thread:  # another thread calling the same model
            return None
        if self.recording:
            batch = self.timesteps[0].shape[0] if self.timesteps else labels.shape[0]
            if (torch.is_tensor(timestep) and timestep.dim() == 1 and timestep.shape[0] == labels.shape[0] == batch):
                self.timesteps.append(timestep)
            else:  # a scalar or broadcast timestep (no per-call tensor to recognise the call by), another batch
                self.unusable = self._off = True
            return None
        k = self._cursor
        self._cursor += 1
        if k >= len(self.timesteps) or timestep is not self.timesteps[k] or labels.shape[0] != timestep.shape[0]:
            self._off = True
            return None
        if k == 0:
            self._rows = self._precompute(model, labels)
            if self._rows is None:
                self._off = True
                return None
        return model.split_modulation(self._rows[k])

    def _precompute(self, model, labels) -> Optional[torch.Tensor]:
        width = model.modulation_width()
        if width is None:
            return None
        nbytes = len(self.timesteps) * labels.shape[0] * width * model.adaln_weight.element_size()
        if nbytes > self.max_bytes:
            return None
        self.precomputes += 1
        return model.modulation_for_calls(self.timesteps, labels)  # (K, N, W)


@contextlib.contextmanager
def scheduled(model, schedule: Optional[ModulationSchedule]):
    """Run one sampling loop of ``model`` with ``schedule`` (None: as usual)."""
    if schedule is None:
        yield
        return
    schedule.begin()
    model._modulation_schedule = schedule
    try:
        yield
    finally:
        model._modulation_schedule = None
        schedule.end()
