"""The samplers' state update (fastdiff.state_update): each implementation, and how a Pipeline picks one."""

import pytest
import torch

import fastdiff
import fastdiff.kernels
from fastdiff import cuda_ext, samplers, state_update
from fastdiff.errors import BadArgumentError
from fastdiff.state_update import combine, combine_torch, current_impl, update_impl
from test_graph_scopes import FakeGraph

MULTISTEP = ["sample_dpmpp_2m", "sample_dpmpp_3m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]


def toy_denoiser(x, sigma):
    """A smooth, state-dependent x0 prediction (so consecutive outputs differ, as a network's do)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x / (1 + s)) * 0.8 + 0.1 * torch.sin(3 * x)


def run(name, impl, seed=0):
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(seed)) * 10
    sigmas = torch.tensor([10.0, 5.0, 2.5, 1.2, 0.6, 0.3, 0.1, 0.0])
    gen = torch.Generator().manual_seed(seed + 1)
    noise = lambda i, like: torch.randn(like.shape, generator=gen)  # noqa: E731
    with update_impl(impl):
        return getattr(samplers, name)(toy_denoiser, x, sigmas, noise=noise)


@pytest.mark.parametrize("name", MULTISTEP)
def test_fused_update_equals_torch_in_the_samplers(name, monkeypatch):
    calls = _spy_kernel(monkeypatch)
    want = run(name, "torch")
    assert not calls
    got = run(name, "triton")
    # one fused update per step except the last (x0): 3 terms at 2nd order, 4 at 3rd, one more with SDE noise
    assert len(calls) == 6 and max(calls) == (4 if "3m" in name else 3) + ("sde" in name)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_cuda_ext_update_maps_terms_to_its_arguments():
    """The extension takes (x, x0, prev, noise, a, b, c, d); a fifth term is added after it."""
    calls = []

    class FakeExtension:
        @staticmethod
        def sampler_update(x, x0, prev=None, noise=None, a=1.0, b=0.0, c=0.0, d=0.0):
            calls.append((prev is not None, noise is not None))
            return cuda_ext.sampler_update_reference(x, x0, prev, noise, a, b, c, d)

    ts = [torch.randn(4, 6) for _ in range(5)]
    for n in (2, 3, 4, 5):
        terms = list(zip((0.9, -1.3, 0.4, 0.25, -2.0), ts[:n]))
        got = state_update._combine_cuda_ext(FakeExtension, terms)
        torch.testing.assert_close(got, combine_torch(terms), rtol=1e-6, atol=1e-6)
    assert calls == [(False, False), (True, False), (True, True), (True, True)]


def _spy_kernel(monkeypatch) -> list:
    fastdiff.kernels.lincomb([(1.0, torch.ones(1))])  # load the kernel first (its first call compiles)
    calls, kernel = [], fastdiff.kernels.lincomb
    monkeypatch.setattr(fastdiff.kernels, "lincomb", lambda terms, **kw: (calls.append(len(terms)), kernel(terms))[1])
    return calls


def test_cuda_ext_without_the_extension_takes_triton(monkeypatch):
    calls = _spy_kernel(monkeypatch)
    terms = [(0.5, torch.randn(2, 3)), (2.0, torch.randn(2, 3))]
    with update_impl("cuda_ext"):  # CPU tensors, no extension: the Triton kernel
        torch.testing.assert_close(combine(terms), combine_torch(terms))
    assert calls == [2]


def test_mixed_layouts_take_torch_and_one_layout_is_kept(monkeypatch):
    calls = _spy_kernel(monkeypatch)
    x = torch.randn(2, 4, 3, 5)
    cl = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    with update_impl("triton"):
        mixed = combine([(0.5, x), (2.0, cl)])  # the kernel would need a copy first: torch instead
        assert calls == []
        torch.testing.assert_close(mixed, combine_torch([(0.5, x), (2.0, cl)]))
        both_cl = combine([(0.5, x.to(memory_format=torch.channels_last)), (2.0, cl)])
        assert calls == [2] and both_cl.stride() == cl.stride()  # fused, and still channels-last
        torch.testing.assert_close(both_cl, 0.5 * x + 2.0 * cl)


def test_float64_and_single_terms_stay_on_torch(monkeypatch):
    monkeypatch.setattr(fastdiff.kernels, "lincomb", lambda *a, **k: pytest.fail("the kernel must not run"))
    x = torch.randn(3, dtype=torch.float64)
    with update_impl("triton"):
        assert combine([(2.0, x), (1.0, x)]).dtype == torch.float64
        torch.testing.assert_close(combine([(0.5, x.float())]), x.float() * 0.5)


def test_update_impl_is_scoped_and_checked():
    assert current_impl() == "torch"
    with update_impl("triton"):
        assert current_impl() == "triton"
        with update_impl("cuda_ext"):
            assert current_impl() == "cuda_ext"
        assert current_impl() == "triton"
    assert current_impl() == "torch"
    with pytest.raises(BadArgumentError, match="sampler_update"):
        with update_impl("cuda"):
            pass


@pytest.mark.parametrize("switches,impl", [
    (dict(), "torch"),                                                    # eager
    (dict(backend="triton"), "triton"),                                   # no GPU: every op on Triton
    (dict(backend="triton", kernel_ops={"sampler_update": "torch"}), "torch"),
    (dict(backend="triton", kernel_ops={"sampler_update": "cuda_ext"}), "cuda_ext"),
    (dict(backend="triton", kernel_ops="all"), "triton"),
])
def test_pipeline_picks_the_update_from_the_kernel_table(switches, impl):
    assert fastdiff.load("arch:tiny-dit").optimize(**switches).update_impl == impl


def test_only_ops_with_a_cuda_kernel_take_cuda_ext():
    with pytest.raises(BadArgumentError, match="attention takes one of"):
        fastdiff.OptimizeConfig(backend="triton", kernel_ops={"attention": "cuda_ext"})


@pytest.mark.parametrize("scope", [None, "loop"])
def test_generate_runs_the_sampler_inside_the_chosen_update(scope, monkeypatch):
    """The network (so the sampler around it) sees the pipeline's choice, also while a loop graph captures."""
    pipe = fastdiff.load("arch:tiny-dit")
    switches = dict(cuda_graphs=True, graph_scope="loop", graph_factory=FakeGraph) if scope else {}
    pipe.optimize(**switches)
    pipe.update_impl = "cuda_ext"  # recorded only: the network below never reaches a state update
    seen = []
    inner = pipe.runner
    pipe.runner = lambda *a, **k: (seen.append(current_impl()), inner(*a, **k))[1]
    monkeypatch.setattr(state_update, "combine", combine_torch)
    monkeypatch.setattr(samplers, "combine", combine_torch)
    pipe.generate(seeds=[1], class_labels=[2], steps=2, sampler="dpmpp_2m", progress=False)
    assert seen and set(seen) == {"cuda_ext"}
    assert current_impl() == "torch"


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("kind", ["discrete", "edm"])
@pytest.mark.parametrize("layout", ["channels_last", "learned_variance_slice"])
def test_denoiser_returns_the_states_layout(kind, layout, prediction):
    """A channels-last (or sliced learned-variance) network output comes back contiguous float32, like the state,
    so the state update sees one layout; the values are those of the plain computation. (With c_skip != 0 the
    skip term's layout would win anyway; "sample" prediction returns the network's output itself.)"""
    from fastdiff.denoiser import DiscreteDenoiser, EDMDenoiser

    def net(x, t, relayout=True, **kw):
        out = torch.cat([x * 0.3 + 0.1, x * 0.5], 1) if layout == "learned_variance_slice" else x * 0.3 + 0.1
        out = out.half()
        return out.to(memory_format=torch.channels_last) if layout == "channels_last" and relayout else out

    def make(model):
        if kind == "discrete":
            return DiscreteDenoiser(model, torch.linspace(0.999, 0.01, 1000), prediction, dtype=torch.half)
        return EDMDenoiser(model, prediction_type=prediction, dtype=torch.half)

    x = torch.randn(2, 4, 3, 5)
    got = make(net).denoise_at(x, 2.0)
    assert got.dtype == torch.float32 and got.is_contiguous()
    plain = make(lambda x, t, **kw: net(x, t, relayout=False).contiguous()).denoise_at(x, 2.0)
    torch.testing.assert_close(got, plain)


def _divided_difference_dpm(x, sigmas, order, solver_type, eta, predict_x0, lower_order_final, noise):
    """DPM-Solver(++) multistep written with divided differences (k-diffusion / diffusers form): the oracle
    of the samplers' one-linear-combination expansion."""
    import math

    sig = [float(s) for s in sigmas]
    n, ms = len(sig) - 1, []
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        den = toy_denoiser(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        ms = (ms + [den if predict_x0 else (x - den) / s])[-order:]
        if s_next == 0:
            x = den
            continue
        k = min(order, i + 1)
        short = lower_order_final and n < 15
        if i == n - 1 and short:
            k = 1
        elif i == n - 2 and short:
            k = min(k, 2)
        h = math.log(s / s_next)
        if predict_x0:
            c0, c1, c1_mid, c2 = samplers._phi_coeffs(h, eta, False)
            x_new = x * (s_next / s * math.exp(-eta * h)) + ms[-1] * c0
        else:
            c0, c1, c1_mid, c2 = samplers._eps_coeffs(h, s_next)
            x_new = x + ms[-1] * c0
        if k == 2:
            r0 = math.log(sig[i - 1] / s) / h
            x_new = x_new + (ms[-1] - ms[-2]) / r0 * (c1_mid if solver_type == "midpoint" else c1)
        elif k == 3:
            r0, r1 = math.log(sig[i - 1] / s) / h, math.log(sig[i - 2] / sig[i - 1]) / h
            d1_0, d1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
            x_new = x_new + (d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))) * c1 + (d1_0 - d1_1) / (r0 + r1) * c2
        if eta > 0:
            x_new = x_new + noise(i, x) * (s_next * math.sqrt(-math.expm1(-2 * eta * h)))
        x = x_new
    return x


@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("predict_x0,eta", [(True, 0.0), (True, 1.0), (False, 0.0)])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_multistep_expansion_equals_divided_differences(order, solver_type, predict_x0, eta, lower_order_final):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 10
    sigmas = torch.tensor([10.0, 6.0, 3.1, 1.7, 0.8, 0.35, 0.1, 0.0], dtype=torch.float64)
    z = [torch.randn(2, 3, 4, 5, dtype=torch.float64) for _ in sigmas]
    noise = lambda i, like: z[i]  # noqa: E731
    want = _divided_difference_dpm(x, sigmas, order, solver_type, eta, predict_x0, lower_order_final, noise)
    got = samplers._dpm_multistep(toy_denoiser, x, sigmas.tolist(), extra_args=None, noise=noise, callback=None,
                                  order=order, eta=eta, s_noise=1.0, solver_type=solver_type,
                                  lower_order_final=lower_order_final, euler_at_final=False, predict_x0=predict_x0,
                                  diffusers_sde3=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def test_layouts_ignore_the_strides_of_size_one_dims():
    from fastdiff.utils.layout import dense_alike

    out = torch.randn(1, 8, 4, 4)[:, :4]  # a batch-1 learned-variance slice: laid out as a contiguous tensor
    assert out.is_contiguous() and out.stride() != torch.empty(1, 4, 4, 4).stride()
    assert dense_alike([torch.randn(1, 4, 4, 4), out])
    assert not dense_alike([torch.randn(2, 4, 4, 4), torch.randn(2, 8, 4, 4)[:, :4]])


def test_denoiser_output_follows_a_channels_last_state():
    from fastdiff.denoiser import _to_state

    x = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    out = torch.randn(2, 4, 3, 5).half()
    got = _to_state(out, x)
    assert got.dtype == torch.float32 and got.stride() == x.stride()
    torch.testing.assert_close(got, out.float())
