"""precompute_adaln: every network call's adaLN modulation of a captured DiT loop from one matmul (CPU, with a
stand-in graph that re-runs the loop on every replay, so each replay goes through the schedule again)."""

import pytest
import torch

import fastdiff
from fastdiff.models.modulation_schedule import ModulationSchedule, scheduled
from helpers import perturb_, rel_err
from test_graph_scopes import FakeGraph


@pytest.fixture(scope="module")
def eager():
    pipe = fastdiff.load("arch:tiny-dit")
    perturb_(pipe.model, seed=3, std=0.2)  # no zero-initialised adaLN: the modulation must matter
    return pipe


def _graphed(eager, **switches):
    pipe = fastdiff.load("arch:tiny-dit")
    pipe.model.load_state_dict(eager.model.state_dict())
    return pipe.optimize(cuda_graphs=True, graph_scope="loop", fuse_adaln=True, batch_buckets=(1, 2, 4),
                         graph_factory=FakeGraph, **switches)


def _count(model, name):
    """Wrap ``model.<name>`` to count its calls (an instance attribute shadows the method)."""
    calls = []
    inner = getattr(model, name)

    def counted(*a, **k):
        calls.append(1)
        return inner(*a, **k)

    setattr(model, name, counted)
    return calls


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "dpmpp_2m_sde"])
def test_precomputed_modulation_equals_eager(eager, sampler):
    pipe = _graphed(eager, precompute_adaln=True)
    assert pipe.precompute_adaln
    per_call = _count(pipe.model, "fused_modulation")
    at_once = _count(pipe.model, "modulation_for_calls")
    kw = dict(steps=4, sampler=sampler, cfg_scale=3.0, progress=False)
    for seeds, labels in (([1, 2, 3], [0, 4, 9]), ([5, 6, 7, 8], [1, 1, 2, 3]), ([7], [2])):
        want = eager.generate(seeds=seeds, class_labels=labels, **kw)
        per_call.clear()
        got = pipe.generate(seeds=seeds, class_labels=labels, **kw)
        assert rel_err(got, want) <= 1e-5, (sampler, seeds)
        if len(seeds) == 4:  # bucket 4 again: a replay, no new warm-up
            assert per_call == []
    # first request: recording run (one per-call matmul per network call), capture, replay; the second a
    # replay of the same graph; the third a new bucket: recording, capture, replay
    assert len(at_once) == 2 + 1 + 2
    assert pipe.loop_graphs.captures == 2


def test_timesteps_not_recognised_fall_back_per_call(eager):
    """A denoiser that builds a new timestep tensor on every call: nothing to match, every call computes its
    own modulation, and the result is unchanged."""
    from fastdiff.denoiser import DiscreteDenoiser

    pipe = _graphed(eager, precompute_adaln=True)
    at_once = _count(pipe.model, "modulation_for_calls")
    fresh = DiscreteDenoiser.predict_at

    def predict_at(self, x, sigma, **cond):
        self._timestep_tensors.clear()  # no cached per-sigma tensors: a new object per call
        return fresh(self, x, sigma, **cond)

    kw = dict(seeds=[1, 2], class_labels=[3, 4], steps=3, sampler="dpmpp_2m", cfg_scale=2.0, progress=False)
    want = eager.generate(**kw)
    DiscreteDenoiser.predict_at = predict_at
    try:
        got = pipe.generate(**kw)
    finally:
        DiscreteDenoiser.predict_at = fresh
    assert rel_err(got, want) <= 1e-5
    assert at_once == []


def _tiny_dit():
    pipe = fastdiff.load("arch:tiny-dit")
    perturb_(pipe.model, seed=5, std=0.2)
    pipe.model.stack_adaln()
    return pipe.model.eval()


def _latents(model, batch: int = 2) -> torch.Tensor:
    cfg = model.config
    return torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)


@torch.no_grad()
def test_schedule_serves_recorded_calls_and_stops_at_a_mismatch():
    model = _tiny_dit()
    x = _latents(model)
    labels = torch.tensor([1, 2])
    ts = [torch.full((2,), float(t)) for t in (900, 500, 100)]
    want = [model(x, t, labels) for t in ts]
    schedule = ModulationSchedule()
    with scheduled(model, schedule):  # the recording run: the model's own path
        got = [model(x, t, labels) for t in ts]
    assert [a is b for a, b in zip(schedule.timesteps, ts)] == [True] * 3
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with scheduled(model, schedule):
        got = [model(x, t, labels) for t in ts]
    assert schedule.precomputes == 1
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, want))
    # a call out of the recorded order turns the schedule off for the rest of the run: still right
    with scheduled(model, schedule):
        got = [model(x, t, labels) for t in (ts[0], ts[2], ts[1])]
    assert all(rel_err(a, model(x, t, labels)) <= 1e-5 for a, t in zip(got, (ts[0], ts[2], ts[1])))
    # more calls than recorded
    with scheduled(model, schedule):
        got = [model(x, t, labels) for t in ts + [ts[0]]]
    assert rel_err(got[-1], want[0]) <= 1e-5
    assert model._modulation_schedule is None  # only set during a run


@torch.no_grad()
def test_schedule_uses_the_first_calls_labels_and_stays_within_its_budget():
    model = _tiny_dit()
    x = _latents(model)
    ts = [torch.full((2,), float(t)) for t in (700, 300)]
    schedule = ModulationSchedule()
    with scheduled(model, schedule):
        for t in ts:
            model(x, t, torch.tensor([0, 1]))
    with scheduled(model, schedule):  # new labels in the (static) conditioning: the rows follow them
        got = [model(x, t, torch.tensor([5, 6])) for t in ts]
    assert all(rel_err(a, model(x, t, torch.tensor([5, 6]))) <= 1e-5 for a, t in zip(got, ts))
    assert schedule.precomputes == 1
    width = model.modulation_width()
    small = ModulationSchedule(max_bytes=2 * 2 * width * 4 - 1)  # one byte short of two calls' rows
    for _ in range(2):
        with scheduled(model, small):
            got = [model(x, t, torch.tensor([0, 1])) for t in ts]
    assert small.precomputes == 0
    assert rel_err(got[1], model(x, ts[1], torch.tensor([0, 1]))) <= 1e-5


@torch.no_grad()
def test_a_recording_with_two_batch_sizes_is_unusable():
    """Calls of other batches during the recording (another caller of the same model): no precompute, no error."""
    model = _tiny_dit()
    xs = [_latents(model, b) for b in (2, 3)]
    ts = [torch.full((b,), 400.0) for b in (2, 3)]
    schedule = ModulationSchedule()
    with scheduled(model, schedule):
        for x, t in zip(xs, ts):
            model(x, t, torch.arange(x.shape[0]))
    with scheduled(model, schedule):
        out = model(xs[0], ts[0], torch.arange(2))
    assert schedule.unusable and schedule.precomputes == 0
    assert rel_err(out, model(xs[0], ts[0], torch.arange(2))) <= 1e-6


@torch.no_grad()
def test_calls_from_another_thread_are_not_the_loops():
    import threading

    model = _tiny_dit()
    x = _latents(model)
    ts = [torch.full((2,), float(t)) for t in (800, 200)]
    schedule = ModulationSchedule()
    with scheduled(model, schedule):
        model(x, ts[0], torch.tensor([0, 1]))
        other = threading.Thread(target=lambda: model(x, torch.full((2,), 10.0), torch.tensor([3, 3])))
        other.start()
        other.join()
        model(x, ts[1], torch.tensor([0, 1]))
    assert [t is r for t, r in zip(schedule.timesteps, ts)] == [True, True] and len(schedule.timesteps) == 2


@torch.no_grad()
def test_scalar_timesteps_leave_the_schedule_unused():
    model = _tiny_dit()
    x = _latents(model)
    schedule = ModulationSchedule()
    for _ in range(2):
        with scheduled(model, schedule):
            out = model(x, 500.0, torch.tensor([0, 1]))
    assert schedule.unusable and schedule.precomputes == 0
    assert rel_err(out, model(x, 500.0, torch.tensor([0, 1]))) <= 1e-6


def test_precompute_adaln_needs_a_loop_graph_and_stacked_projections():
    pipe = fastdiff.load("arch:tiny-dit").optimize(fuse_adaln=True, precompute_adaln=True)  # no graphs
    assert not pipe.precompute_adaln and any("precompute_adaln ignored" in n for n in pipe.notes)
    pipe = fastdiff.load("arch:tiny-unet").optimize(cuda_graphs=True, graph_scope="loop", precompute_adaln=True,
                                                    graph_factory=FakeGraph)
    assert not pipe.precompute_adaln and any("precompute_adaln ignored" in n for n in pipe.notes)
    pipe = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope="loop", fuse_adaln=True,
                                                   graph_factory=FakeGraph)
    # the default (None) turns it on only on a CUDA device (measured there); quietly off here
    assert not pipe.precompute_adaln and not any("precompute_adaln" in n for n in pipe.notes)
    pipe = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope="loop", fuse_adaln=True,
                                                   precompute_adaln=None, graph_factory=FakeGraph)
    assert not pipe.precompute_adaln
    with pytest.raises(fastdiff.BadArgumentError, match="precompute_adaln"):
        fastdiff.OptimizeConfig(precompute_adaln="yes")
