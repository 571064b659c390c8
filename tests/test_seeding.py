"""Per-sample seeding: a batch of 4 with seeds [a, b, c, d] equals 4 single runs, for deterministic and
stochastic samplers; and NoiseSource draws what diffusers draws for a list of generators."""

import pytest
import torch

from fastdiff.denoiser import DiscreteDenoiser
from fastdiff.noise import NoiseSource, randn
from fastdiff.samplers import SAMPLERS
from helpers import sampler_test_options
from fastdiff.schedules import get_sigmas, make_alphas_cumprod
from test_sampler_order import single_thread  # noqa: F401,E402  (autouse fixture)

SEEDS = [11, 22, 33, 44]
SHAPE = (2, 5, 5)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(2, 2, 3, 3, generator=g) * 0.3)

    def forward(self, x, t, class_labels=None, encoder_hidden_states=None):
        return torch.tanh(torch.nn.functional.conv2d(x, self.w, padding=1)) + 0.01 * torch.cos(t.float() / 300)[:, None, None, None]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_batch_equals_single_runs(name):
    ac = make_alphas_cumprod("linear")
    den = DiscreteDenoiser(Net(), ac, timestep_rounding="round")
    sigmas = get_sigmas("karras", 6, alphas_cumprod=ac)
    opts = dict(eta=1.0) if name == "ddim" else dict(s_churn=20.0) if name == "edm" else \
        sampler_test_options(name, ac, sigmas)

    def run(seeds):
        src = NoiseSource(seeds)
        x = src.randn(SHAPE) * float(sigmas[0])
        return SAMPLERS[name](den, x, sigmas, noise=src, **opts)

    batch = run(SEEDS)
    singles = torch.cat([run([s]) for s in SEEDS])
    torch.testing.assert_close(batch, singles, rtol=1e-4, atol=1e-4)
    # a different batch composition leaves sample 0 unchanged
    torch.testing.assert_close(run([SEEDS[0], 99])[:1], singles[:1], rtol=1e-4, atol=1e-4)


def test_stochastic_samplers_use_the_noise():
    ac = make_alphas_cumprod("linear")
    den = DiscreteDenoiser(Net(), ac)
    sigmas = get_sigmas("karras", 5, alphas_cumprod=ac)
    x = randn([1], SHAPE) * float(sigmas[0])
    a = SAMPLERS["euler_ancestral"](den, x, sigmas, noise=NoiseSource([1]))
    b = SAMPLERS["euler_ancestral"](den, x, sigmas, noise=NoiseSource([2]))
    assert (a - b).abs().max() > 1e-3


def test_noise_source_matches_diffusers_generator_list():
    torch_utils = pytest.importorskip("diffusers.utils.torch_utils")
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    src = NoiseSource(SEEDS)
    for _ in range(3):                                  # sequential draws stay aligned
        ref = torch_utils.randn_tensor((4,) + SHAPE, generator=gens)
        torch.testing.assert_close(src.randn(SHAPE), ref, rtol=0, atol=0)


def test_noise_source_rejects_wrong_batch():
    from fastdiff.errors import BadArgumentError
    with pytest.raises(BadArgumentError, match="one per seed"):
        NoiseSource([1, 2])(0, torch.zeros(3, 2))
    with pytest.raises(BadArgumentError, match="seeds"):
        NoiseSource([])
