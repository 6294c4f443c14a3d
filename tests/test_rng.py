"""Gaussian probes drawn in parallel chunks on the CPU: reproducible from the generator whatever the
thread count, and standard normal."""
import math

import torch

from relflat_ext.core.rng import CHUNK, standard_normal


def _draw(threads, seed=0, shape=(3, CHUNK + 5)):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return standard_normal(shape, torch.Generator().manual_seed(seed), torch.float32, "cpu")
    finally:
        torch.set_num_threads(before)


def test_same_generator_same_numbers_whatever_the_thread_count():
    one, two, four = _draw(1), _draw(2), _draw(4)
    assert one.shape == (3, CHUNK + 5)
    assert torch.equal(one, two) and torch.equal(one, four)
    assert not torch.equal(one, _draw(2, seed=1))


def test_chunks_are_independent_standard_normals():
    x = _draw(2, shape=(4 * CHUNK,)).double()
    chunks = x.view(4, CHUNK)
    assert abs(x.mean().item()) < 5 / math.sqrt(x.numel())
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / x.numel())
    corr = torch.corrcoef(chunks)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 5 / math.sqrt(CHUNK)


def test_small_draws_are_torch_randn():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(standard_normal((5, 7), g1, torch.float64, "cpu"),
                       torch.randn((5, 7), generator=g2, dtype=torch.float64))
