"""cuda_graphs with graph_scope "step" and "loop" through the Pipeline, using a stand-in graph (CPU).

The stand-in mimics a CUDA graph: it records the function on static buffers and recomputes into one
fixed output tensor on replay, so stale inputs, missed noise refills or wrong padding show up.
"""

import pytest

import fastdiff
from helpers import rel_err


class FakeGraph:
    def __init__(self, fn, static_inputs, pool=None):
        self.fn, self.static = fn, static_inputs
        self.output = fn(*static_inputs).clone()
        self.pool = pool or object()

    def replay(self):
        self.output.copy_(self.fn(*self.static))
        return self.output


@pytest.fixture(scope="module")
def eager():
    return fastdiff.load("arch:tiny-dit")


@pytest.mark.parametrize("scope", ["step", "loop"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "plms", "lcm"])
def test_graph_replay_equals_eager(eager, scope, sampler):
    graphed = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(1, 2, 4),
                                                      graph_factory=FakeGraph)
    kw = dict(steps=3, sampler=sampler, cfg_scale=3.0, progress=False)
    for seeds, labels in (([1, 2, 3], [0, 4, 9]), ([7], [2]), ([5, 6], [1, 1]), ([8, 9, 10], [3, 3, 3])):
        want = eager.generate(seeds=seeds, class_labels=labels, **kw)
        got = graphed.generate(seeds=seeds, class_labels=labels, **kw)
        assert rel_err(got, want) <= 1e-5
    if scope == "loop":
        assert graphed.loop_graphs.captures == 3  # buckets 4, 1, 2; the second batch of 3 replays bucket 4
    else:
        # CFG doubles the network batch and the network buckets double with it (1, 2, 4, 8):
        # 6 -> 8, 2 -> 2, 4 -> 4, 6 -> 8 again: three graphs
        assert graphed.runner.captures == 3
        assert graphed.runner.buckets == (1, 2, 4, 8)


def test_guided_request_runs_its_doubled_batch_in_one_network_call():
    """A guided batch-1 request with buckets (1,) is one network call of batch 2, never two calls of 1."""
    calls = []
    pipe = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope="step", batch_buckets=(1,),
                                                   graph_factory=FakeGraph)
    inner = pipe.runner.network
    pipe.runner.network = lambda x, *a, **k: (calls.append(x.shape[0]), inner(x, *a, **k))[1]
    pipe.generate(seeds=[1], class_labels=[3], steps=2, sampler="ddim", cfg_scale=2.0, progress=False)
    assert calls and set(calls) == {2}


def test_loop_graph_recaptures_for_new_steps_and_guidance(eager):
    graphed = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(2,),
                                                      graph_factory=FakeGraph)
    graphed.generate(seeds=[1, 2], class_labels=[1, 2], steps=2, sampler="ddim", progress=False)
    graphed.generate(seeds=[3, 4], class_labels=[1, 2], steps=2, sampler="ddim", progress=False)
    assert graphed.loop_graphs.captures == 1
    graphed.generate(seeds=[3, 4], class_labels=[1, 2], steps=3, sampler="ddim", progress=False)
    graphed.generate(seeds=[3, 4], class_labels=[1, 2], steps=3, sampler="ddim", cfg_scale=2.0, progress=False)
    assert graphed.loop_graphs.captures == 3  # guided: the unconditional pass joins the loop
    graphed.generate(seeds=[3, 4], class_labels=[1, 2], steps=3, sampler="ddim", cfg_scale=5.0, progress=False)
    assert graphed.loop_graphs.captures == 3  # another scale: an input of the same loop


def test_guidance_rescale_is_an_input_of_the_captured_loop(eager):
    """A new guidance_rescale replays the loop captured for the first (phi is an input, not a baked-in float), and
    each run equals eager at its phi; phi = 0 runs without the rescale's arithmetic (its own loop)."""
    graphed = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(2,),
                                                      graph_factory=FakeGraph)
    kw = dict(seeds=[1, 2], class_labels=[1, 7], steps=3, sampler="dpmpp_2m", cfg_scale=4.0, progress=False)
    runs = {phi: graphed.generate(guidance_rescale=phi, **kw) for phi in (0.3, 0.9)}
    assert graphed.loop_graphs.captures == 1
    for phi, got in runs.items():
        assert rel_err(got, eager.generate(guidance_rescale=phi, **kw)) <= 1e-5
    assert rel_err(runs[0.3], runs[0.9]) > 1e-3  # (phi reached the replayed loop)
    assert rel_err(graphed.generate(guidance_rescale=0.0, **kw), eager.generate(**kw)) <= 1e-5
    assert graphed.loop_graphs.captures == 2
    # one phi per sample (the Engine batches requests so): each row its own run's, the loop the first one
    both = graphed.generate(guidance_rescale=[0.9, 0.0], **kw)
    assert graphed.loop_graphs.captures == 2
    assert rel_err(both[0], runs[0.9][0]) <= 1e-5 and rel_err(both[1], eager.generate(**kw)[1]) <= 1e-5
    with pytest.raises(fastdiff.errors.BadArgumentError, match=r"guidance_rescale: expected a finite number, or 2"):
        eager.generate(guidance_rescale=[0.1, 0.2, 0.3], **kw)


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_per_sample_cfg_scales_batch_and_need_no_new_capture(eager, scope):
    """cfg_scale one per sample: each sample equals its own run at its scale (eager, solo), and a captured loop takes
    the scales as an input: new scales replay the graph of an earlier call instead of capturing another."""
    graphed = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(4,),
                                                      graph_factory=FakeGraph)
    kw = dict(steps=3, sampler="dpmpp_2m", progress=False)
    seeds, labels = [1, 2, 3], [0, 4, 9]
    for scales in ([2.0, 5.0, 3.5], [7.5, 1.5, 4.0]):
        got = graphed.generate(seeds=seeds, class_labels=labels, cfg_scale=scales, **kw)
        for i in range(3):
            solo = eager.generate(seeds=[seeds[i]], class_labels=[labels[i]], cfg_scale=scales[i], **kw)
            assert rel_err(got[i:i + 1], solo) <= 1e-5
    same = graphed.generate(seeds=seeds, class_labels=labels, cfg_scale=4.0, **kw)  # one scale for all: the same
    assert rel_err(same, eager.generate(seeds=seeds, class_labels=labels, cfg_scale=4.0, **kw)) <= 1e-5
    captures = graphed.loop_graphs.captures if scope == "loop" else graphed.runner.captures
    assert captures == 1


def test_loop_graph_cache_keeps_at_most_max_graphs():
    """OptimizeConfig.max_graphs bounds the captured loops: with 1, a loop of other steps drops the first."""
    graphed = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(1,),
                                                      max_graphs=1, graph_factory=FakeGraph)
    for steps in (1, 2, 1):
        graphed.generate(seeds=[1], class_labels=[1], steps=steps, sampler="ddim", progress=False)
    assert graphed.loop_graphs.captures == 3 and len(graphed.loop_graphs.entries) == 1


def test_cuda_graphs_without_cuda_is_a_note_not_an_error():
    pipe = fastdiff.load("arch:tiny-unet").optimize(cuda_graphs=True)
    assert any("cuda_graphs ignored" in n for n in pipe.notes)
    assert pipe.generate(seeds=[1], steps=2, progress=False).shape == (1, 3, 16, 16)


def test_loop_graph_chunks_batches_beyond_the_largest_bucket(eager):
    graphed = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(2,),
                                                      graph_factory=FakeGraph)
    kw = dict(seeds=[1, 2, 3, 4, 5], class_labels=[0, 1, 2, 3, 4], steps=2, sampler="euler_ancestral",
              cfg_scale=2.0, progress=False)
    assert rel_err(graphed.generate(**kw), eager.generate(**kw)) <= 1e-5


def test_loop_graph_reuses_scheduler_config_plans_and_refuses_callbacks():
    graphed = fastdiff.load("arch:tiny-unet").optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(1,),
                                                       graph_factory=FakeGraph)
    for s in (1, 2, 3):  # the checkpoint's scheduler config (its plan holds fresh closures each call)
        graphed.generate(seeds=[s], steps=3, progress=False)
    assert graphed.loop_graphs.captures == 1
    with pytest.raises(fastdiff.BadArgumentError, match="callback"):
        graphed.generate(seeds=[1], steps=3, progress=False, callback=lambda info: None)


class OutputOnlyGraph:
    """Like torch.cuda.CUDAGraph: keeps only what the capture touched, not the Python function.

    A replay re-runs nothing; it must find every tensor the capture read still alive."""

    def __init__(self, fn, static_inputs, pool=None):
        import weakref

        self.read = []
        self.pool = pool or object()
        runner = fn
        self.output = runner(*static_inputs).clone()
        self._fn = weakref.ref(fn)  # a weak reference only: the cache must keep the function alive

    def replay(self):
        fn = self._fn()
        assert fn is not None, "the captured loop (and the tensors it read) was freed while its graph lives"
        return self.output


def test_loop_graph_keeps_what_the_capture_read_alive():
    import gc

    pipe = fastdiff.load("arch:tiny-dit").optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(1,),
                                                   graph_factory=OutputOnlyGraph)
    pipe.generate(seeds=[1], class_labels=[2], steps=2, sampler="ddim", progress=False)
    gc.collect()
    pipe.generate(seeds=[2], class_labels=[3], steps=2, sampler="ddim", progress=False)  # replays: no assert


def test_cuda_graphs_with_onnxruntime_is_a_note():
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    pipe = fastdiff.load("arch:tiny-dit").optimize(backend="onnxruntime", cuda_graphs=True, graph_scope="loop",
                                                   graph_factory=FakeGraph)
    assert pipe.loop_graphs is None and any("onnxruntime" in n for n in pipe.notes)


def _clipper(r):
    return lambda x0, r=r: x0.clamp(-r, r)  # r is a default, not a closure cell


def test_loop_graph_key_tells_sampler_functions_apart():
    """Two clip functions from one source line with different bound values are different loops; a fresh
    function with the same code and values replays the captured one."""
    eager = fastdiff.load("arch:tiny-unet")
    loop = fastdiff.load("arch:tiny-unet").optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(1,),
                                                    graph_factory=FakeGraph)
    kw = dict(seeds=[3], steps=4, sampler="ddim", progress=False)
    for r in (0.05, 1.0):
        assert rel_err(loop.generate(clip_x0=_clipper(r), **kw), eager.generate(clip_x0=_clipper(r), **kw)) <= 1e-6
    assert loop.loop_graphs.captures == 2
    loop.generate(clip_x0=_clipper(1.0), **kw)
    assert loop.loop_graphs.captures == 2


def test_freeze_keys_tensors_by_their_values():
    import torch

    from fastdiff.utils.keys import freeze as _freeze

    t = torch.tensor([1.0, 2.0, 3.0])
    assert _freeze(t) == _freeze(t.clone()) and _freeze(t) != _freeze(t.flip(0))  # same sums, other order
    assert _freeze(torch.tensor([1.0], dtype=torch.bfloat16)) != _freeze(torch.tensor([1.0]))


def test_loop_graph_keys_numpy_options_and_partials_by_value():
    """A NumPy array among the options (DDIM's sigmas_to) keys the loop by its values, as a tensor does (it was a raw
    TypeError: unhashable); an equal functools.partial made afresh replays the captured loop."""
    import functools

    import numpy as np
    import torch

    eager = fastdiff.load("arch:tiny-unet")
    loop = fastdiff.load("arch:tiny-unet").optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(1,),
                                                    graph_factory=FakeGraph)
    kw = dict(seeds=[3], steps=4, sampler="ddim", progress=False)
    targets = eager.plan(4, "ddim").sigmas[1:].numpy() * 0.9
    for to in (targets, targets * 0.5):
        assert rel_err(loop.generate(sigmas_to=to, **kw), eager.generate(sigmas_to=to, **kw)) <= 1e-6
    loop.generate(sigmas_to=targets.copy(), **kw)
    assert loop.loop_graphs.captures == 2
    for _ in range(2):
        clip = functools.partial(torch.clamp, min=-0.5, max=0.5)
        assert rel_err(loop.generate(clip_x0=clip, **kw), eager.generate(clip_x0=clip, **kw)) <= 1e-6
    assert loop.loop_graphs.captures == 3
    from fastdiff.utils.keys import freeze as _freeze

    assert _freeze(np.arange(3.0)) != _freeze(np.arange(3.0).astype(np.float32))


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_threads_sharing_a_graphed_pipe_get_their_own_samples(scope):
    """Two threads generating on one graphed pipe (two Engines over one pipe, or a direct call while an Engine
    serves) each get their own seed's sample: the static buffers are used by one call at a time."""
    import threading

    eager = fastdiff.load("arch:tiny-unet")
    pipe = fastdiff.load("arch:tiny-unet").optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(1,),
                                                    graph_factory=FakeGraph)
    kw = dict(steps=6, sampler="euler_ancestral", progress=False)
    want = {s: eager.generate(seeds=[s], **kw) for s in (1, 2)}
    pipe.generate(seeds=[1], **kw)  # the capture
    errors = {1: [], 2: []}

    def work(seed):
        for _ in range(8):
            errors[seed].append(rel_err(pipe.generate(seeds=[seed], **kw), want[seed]))

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors[1]) == len(errors[2]) == 8 and max(errors[1] + errors[2]) <= 1e-6


def test_compile_without_working_graphs_still_pads_to_buckets():
    """cuda_graphs=True on a machine without CUDA: graphs are ignored, and the compiled network still sees
    bucket batch sizes only (dynamic=False compiles once per bucket)."""
    from fastdiff.runtime.graphs import BucketPadded

    pipe = fastdiff.load("arch:tiny-unet").optimize(backend="compile", cuda_graphs=True)
    assert isinstance(pipe.runner, BucketPadded)
