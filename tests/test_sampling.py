"""Sampling draws from the right distribution, is reproducible, and the partial top-k path
picks exactly what the full sort picks."""

import torch

from fastcsm.sampling import counter_noise, sample

V = 300


def params(B, temperature, topk, topp):
    return (torch.full((B,), float(temperature)), torch.full((B,), topk, dtype=torch.long),
            torch.full((B,), float(topp)))


def draws(logits, n, temperature=1.0, topk=0, topp=1.0, candidates=None):
    """n draws for one row of logits, each with its own frame counter."""
    B = n
    noise = counter_noise(torch.full((B,), 7), torch.arange(B), 0, logits.shape[-1])
    return sample(logits.expand(B, -1), noise, *params(B, temperature, topk, topp), candidates)


def test_frequencies_follow_the_softmax():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2
    picks = draws(logits, 40_000)
    freq = torch.bincount(picks, minlength=V).float() / picks.numel()
    p = torch.softmax(logits, -1)
    assert (freq - p).abs().max() < 0.01
    assert abs((freq * logits).sum() - (p * logits).sum()) < 0.02


def test_temperature_topk_topp_shape_the_distribution():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    top = logits.topk(10).indices
    picks = draws(logits, 5000, temperature=0.7, topk=10)
    assert torch.isin(picks, top).all()
    p = torch.softmax(logits / 0.7, -1)
    sorted_p, order = p.sort(descending=True)
    nucleus = order[: int((sorted_p.cumsum(0) < 0.5).sum()) + 1]
    picks = draws(logits, 5000, temperature=0.7, topp=0.5)
    assert torch.isin(picks, nucleus).all() and len(picks.unique()) == len(nucleus)


def test_zero_temperature_is_greedy():
    logits = torch.randn(4, V)
    noise = counter_noise(torch.arange(4), torch.zeros(4, dtype=torch.long), 0, V)
    assert torch.equal(sample(logits, noise, *params(4, 0.0, 50, 1.0)), logits.argmax(-1))


def test_partial_topk_picks_what_the_full_sort_picks():
    g = torch.Generator().manual_seed(2)
    for topk, topp, temp in [(50, 1.0, 0.9), (64, 0.8, 1.3), (1, 1.0, 0.5), (20, 0.3, 0.9)]:
        logits = torch.randn(256, 2048, generator=g) * 3
        noise = counter_noise(torch.arange(256), torch.zeros(256, dtype=torch.long), 5, 2048)
        p = params(256, temp, topk, topp)
        assert torch.equal(sample(logits, noise, *p, candidates=64), sample(logits, noise, *p))


def test_counter_noise_is_a_pure_function_of_its_counters():
    seed, frame = torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0])
    a = counter_noise(seed, frame, 2, V)
    assert torch.equal(a, counter_noise(seed, frame, 2, V))
    assert torch.equal(a[1], counter_noise(seed[1:2], frame[1:2], 2, V)[0])  # batch-independent
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert not torch.equal(a, counter_noise(seed, frame, 3, V))
    assert (a > 0).all() and abs(a.mean() - 1) < 0.1
