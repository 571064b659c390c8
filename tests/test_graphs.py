"""Graph cache, batch buckets, padding and static buffers, with a stand-in graph object (CPU)."""

import pytest
import torch

from fastdiff.errors import BadArgumentError
from fastdiff.runtime.graphs import GraphedNetwork, bucket_for, pad_to


class FakeGraph:
    """Mimics CUDA-graph semantics: captured on static buffers; replay recomputes into a fixed output."""

    created = 0

    def __init__(self, fn, static_inputs, pool=None):
        FakeGraph.created += 1
        self.fn, self.static = fn, static_inputs
        self.output = fn(*static_inputs).clone()
        self.pool = pool or object()
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.output.copy_(self.fn(*self.static))
        return self.output


def net(x, t, class_labels=None, encoder_hidden_states=None):
    out = x * 2 + t.float().view(-1, 1, 1, 1)
    if class_labels is not None:
        out = out + class_labels.float().view(-1, 1, 1, 1)
    return out


@pytest.mark.parametrize("n,want", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8)])
def test_bucket_for(n, want):
    assert bucket_for(n, (1, 2, 4, 8)) == want


def test_bucket_too_large():
    with pytest.raises(BadArgumentError):
        bucket_for(9, (1, 2, 4, 8))


def test_pad_repeats_last_row():
    t = torch.arange(6.0).view(3, 2)
    p = pad_to(t, 5)
    assert p.shape == (5, 2) and torch.equal(p[3], t[2]) and torch.equal(p[:3], t)


def test_replay_matches_eager_and_reuses_buckets():
    g = GraphedNetwork(net, buckets=(1, 2, 4), graph_factory=FakeGraph)
    for n in (3, 4, 3, 1, 2, 4):
        x, t = torch.randn(n, 2, 4, 4), torch.randint(0, 1000, (n,))
        y = torch.randint(0, 10, (n,))
        out = g(x, t, y)
        assert out.shape == x.shape
        torch.testing.assert_close(out, net(x, t, y))
    assert g.captures == 3  # buckets 4, 1, 2: a request that fits an existing bucket never recaptures


def test_result_survives_next_replay():
    g = GraphedNetwork(net, buckets=(2,), graph_factory=FakeGraph)
    a = g(torch.ones(2, 1, 2, 2), torch.tensor([1, 1]))
    g(torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]))
    assert torch.equal(a, torch.full((2, 1, 2, 2), 3.0))  # cloned out of the static buffer


def test_new_resolution_or_dtype_is_a_new_graph_and_cache_is_bounded():
    g = GraphedNetwork(net, buckets=(1,), max_graphs=2, graph_factory=FakeGraph)
    g(torch.randn(1, 1, 4, 4), torch.tensor([1]))
    g(torch.randn(1, 1, 8, 8), torch.tensor([1]))
    g(torch.randn(1, 1, 8, 8, dtype=torch.float64), torch.tensor([1]))
    assert g.captures == 3 and len(g.graphs) == 2
    g(torch.randn(1, 1, 4, 4), torch.tensor([1]))  # evicted: captured again
    assert g.captures == 4


def test_batches_larger_than_the_largest_bucket_are_chunked():
    g = GraphedNetwork(net, buckets=(1, 2), graph_factory=FakeGraph)
    x, t = torch.randn(5, 1, 2, 2), torch.arange(5)
    torch.testing.assert_close(g(x, t), net(x, t))


def test_scalar_timestep_broadcasts():
    g = GraphedNetwork(net, buckets=(4,), graph_factory=FakeGraph)
    x = torch.randn(3, 1, 2, 2)
    torch.testing.assert_close(g(x, torch.tensor(7)), net(x, torch.full((3,), 7)))


def test_bucket_padded_network_only_sees_bucket_sizes():
    from fastdiff.runtime.graphs import BucketPadded

    seen = []

    def recording(x, t, class_labels=None, encoder_hidden_states=None):
        seen.append(x.shape[0])
        return net(x, t, class_labels, encoder_hidden_states)

    padded = BucketPadded(recording, buckets=(2, 4))
    for n in (1, 3, 4, 6):
        x, t = torch.randn(n, 1, 2, 2), torch.arange(n)
        torch.testing.assert_close(padded(x, t), net(x, t))
    assert set(seen) <= {2, 4}


def _recording(made: list):
    """A graph factory that keeps (pool it was given, graph) for every capture."""
    def factory(fn, static_inputs, pool=None):
        made.append((pool, FakeGraph(fn, static_inputs, pool=pool)))
        return made[-1][1]
    return factory


def test_graphs_share_one_memory_pool():
    """The first capture makes the pool; every later capture (other buckets, resolutions) allocates from it."""
    made = []
    g = GraphedNetwork(net, buckets=(1, 2, 4), graph_factory=_recording(made))
    for n, hw in ((1, 2), (2, 2), (3, 2), (1, 4)):
        g(torch.randn(n, 1, hw, hw), torch.arange(n))
    first_pool = made[0][1].pool
    assert len(made) == 4 and made[0][0] is None and first_pool is not None
    assert all(pool is first_pool for pool, _ in made[1:])


def test_loop_graph_cache_is_bounded_and_shares_one_memory_pool():
    """LoopGraphCache (graph_scope="loop"): least recently used loops are dropped beyond max_graphs (a dropped
    one is captured again), and every capture allocates from the first one's pool."""
    from fastdiff.runtime.loop_graph import LoopGraphCache

    made = []
    cache = LoopGraphCache(max_graphs=2, graph_factory=_recording(made))

    def run_loop(x, cond, noise):  # stands in for a sampling loop: reads its conditioning and one noise draw
        return x * 2 + cond["y"] + noise(0, x)

    for key in ("a", "b", "a", "c", "b"):  # "c" drops "b" (least recently used), so "b" is captured again
        x = torch.randn(2, 3)
        out = cache.run((key,), run_loop, x, {"y": torch.full((2, 3), 3.0)}, lambda i, like: torch.ones_like(like))
        torch.testing.assert_close(out, x * 2 + 4)
        assert len(cache.entries) <= 2
    assert cache.captures == 4 and list(cache.entries) == [("c",), ("b",)]
    first_pool = made[0][1].pool
    assert made[0][0] is None and all(pool is first_pool for pool, _ in made[1:])


def _net_with_parts(x, t, class_labels=None, encoder_hidden_states=None, parts=None):
    """x plus the sum of each part's rows (None parts skipped): several IP-Adapters' features travel like this."""
    out = x * 1.0
    for p in parts:
        if p is not None:
            out = out + p.sum(dim=tuple(range(1, p.dim())))[:, None]
    return out


@pytest.mark.parametrize("kind", [tuple, list])
def test_tuple_and_list_conditioning_is_padded_chunked_and_copied_per_tensor(kind):
    """A conditioning value that is a tuple (or list) of tensors, None entries kept: padded to the bucket, chunked
    beyond the largest one, copied into its own static buffers (a second call with other values replays the same
    graph and reads them), and stacked tensor by tensor for CFG."""
    from fastdiff.denoiser import CFGDenoiser

    g = GraphedNetwork(_net_with_parts, buckets=(2, 4), graph_factory=FakeGraph)
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        x, parts = torch.randn(3, 5, generator=gen), kind([None, torch.randn(3, 2, 4, generator=gen)])
        assert torch.allclose(g(x, torch.zeros(3), parts=parts), _net_with_parts(x, None, parts=parts))
        big = torch.randn(7, 5, generator=gen), kind([torch.randn(7, 3, generator=gen), None])
        assert torch.allclose(g(big[0], torch.zeros(7), parts=big[1]), _net_with_parts(big[0], None, parts=big[1]))
    assert g.captures == 2  # bucket 4, once per layout of the parts (which entry is None): the second seed replayed
    u, c = kind([torch.zeros(2, 3), None]), kind([torch.ones(2, 3), None])
    stacked = CFGDenoiser._stack({"parts": c}, {"parts": u})["parts"]
    assert stacked[1] is None and torch.equal(stacked[0], torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
