"""Quality vs network evaluations (NFE), per sampler: what a few-step engine has to show.

``quality_table(pipe, ...)`` samples ``builtin:digits`` (or any digits-shaped class model) with every
sampler at each NFE budget, the same seeds and class labels for every cell, and reports digits-FD against
the real digits and the class accuracy of the guided samples.

NFE counts denoiser evaluations (a guided evaluation is one batched network call). A sampler's step
count for an NFE budget is the largest one whose plan evaluates the denoiser at most that many times
(Heun / EDM: 2 per step but 1 on the last; single-step DPM-Solver: mixed orders): counted, not assumed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from ..errors import BadArgumentError

DEFAULT_NFES = (4, 6, 8, 10, 15, 20, 50, 100)


@dataclass
class QualityRow:
    sampler: str
    nfe_budget: int
    steps: int
    nfe: int
    digits_fd: float
    accuracy: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def count_nfe(pipe, sampler: str, steps: int) -> int:
    """Denoiser evaluations of ``sampler`` with ``steps`` steps on this pipeline's grid (a dry run)."""
    from ..controlnet import evaluations

    return evaluations(pipe.plan(steps, sampler))


def steps_for_nfe(pipe, sampler: str, nfe: int) -> Optional[int]:
    """The most steps whose NFE fits the budget (None if even one step does not)."""
    best = None
    for steps in range(1, nfe + 1):
        used = count_nfe(pipe, sampler, steps)
        if used <= nfe:
            best = steps
        if used >= nfe:
            break
    return best


def quality_table(pipe, samplers: Optional[Sequence[str]] = None, nfes: Sequence[int] = DEFAULT_NFES,
                  per_class: int = 20, cfg_scale: float = 3.0, seed: int = 0, progress=None) -> list[QualityRow]:
    """digits-FD and class accuracy for every (sampler, NFE) cell; same seeds and labels in every cell."""
    from ..sampling import SAMPLERS
    from .digits import class_accuracy, digits_fd

    if pipe.spec.num_classes != 10 or pipe.spec.in_channels != 1:
        raise BadArgumentError(f"quality_table needs a 10-class, 1-channel digits model (builtin:digits), found "
                               f"{pipe.spec.num_classes} classes, {pipe.spec.in_channels} channel(s)")
    if samplers is None:
        samplers = sorted(SAMPLERS)
        if pipe.spec.prediction_type == "flow_prediction":  # (tcd has no meaning on a flow model)
            from ..flow import REFUSED
            samplers = [s for s in samplers if s not in REFUSED]
    samplers = list(samplers)
    labels = torch.arange(10).repeat_interleave(per_class)
    seeds = [seed + i for i in range(len(labels))]
    rows = []
    for sampler in samplers:
        for nfe in nfes:
            steps = steps_for_nfe(pipe, sampler, nfe)
            if steps is None:
                continue
            t0 = time.perf_counter()
            x = pipe.generate(seeds=seeds, class_labels=labels, cfg_scale=cfg_scale, steps=steps, sampler=sampler,
                              progress=False)
            rows.append(QualityRow(sampler, nfe, steps, count_nfe(pipe, sampler, steps), digits_fd(x),
                                   class_accuracy(x, labels), time.perf_counter() - t0))
            if progress is not None:
                progress(rows[-1])
    return rows


def format_table(rows: Sequence[QualityRow]) -> str:
    """Two grids (digits-FD, accuracy): one row per sampler, one column per NFE budget."""
    nfes = sorted({r.nfe_budget for r in rows})
    samplers = list(dict.fromkeys(r.sampler for r in rows))
    cell = {(r.sampler, r.nfe_budget): r for r in rows}
    out = []
    for title, fmt in (("digits-FD (lower is better)", lambda r: f"{r.digits_fd:8.2f}"),
                       ("class accuracy of guided samples", lambda r: f"{r.accuracy:8.3f}")):
        out.append(title)
        out.append(f"{'sampler':<16}" + "".join(f"{'NFE ' + str(n):>9}" for n in nfes))
        for s in samplers:
            out.append(f"{s:<16}" + "".join(f"{fmt(cell[(s, n)]):>9}" if (s, n) in cell else f"{'-':>9}"
                                              for n in nfes))
        out.append("")
    return "\n".join(out)
