"""Sampling draws from the right distribution, is reproducible, and the partial top-k path
picks exactly what the full sort picks."""

import functools

import torch

from fastcsm.sampling import FrameNoise, counter_noise, pick, row_params, sample

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


# The formulas as first written (one codebook at a time): the restructured sampler must give
# exactly their bits for every seed, frame, codebook and setting.
def _ref_mix32(x):
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def _ref_counter_noise(seed, frame, codebook, vocab):
    s = _ref_mix32(_ref_mix32(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF))
    key = _ref_mix32((s + frame * 64 + codebook) & 0xFFFFFFFF)
    bits = _ref_mix32((_ref_mix32(key[:, None] ^ torch.arange(vocab)) + s[:, None]) & 0xFFFFFFFF)
    return -torch.log(((bits >> 8).float() + 0.5) * (1.0 / (1 << 24)))


def _ref_sample(logits, noise, temperature, topk, topp, candidates=None):
    logits = logits.float()
    V = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    scores = logits / temperature.clamp_min(1e-6)[:, None]
    if candidates is not None and candidates < V:
        best, order = scores.topk(candidates, dim=-1)
    else:
        best, order = scores.sort(dim=-1, descending=True)
    keep = torch.arange(best.shape[-1])[None, :] < torch.where(topk > 0, topk, V)[:, None]
    probs = torch.softmax(best.masked_fill(~keep, float("-inf")), dim=-1)
    keep &= (probs.cumsum(dim=-1) - probs) < topp[:, None]
    race = (best - noise.gather(-1, order).log()).masked_fill(~keep, float("-inf"))
    picked = order.gather(-1, race.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, picked, greedy)


def _random_rows(g, B):
    seed = torch.randint(-(1 << 62), 1 << 62, (B,), generator=g)
    frame = torch.randint(0, 1 << 40, (B,), generator=g)
    temperature = torch.rand(B, generator=g) * 1.5
    temperature[::5] = 0.0  # greedy rows mixed in
    topk = torch.randint(1, 64, (B,), generator=g)
    topp = torch.rand(B, generator=g).clamp_min(0.05)
    topp[::3] = 1.0
    return seed, frame, temperature, topk, topp


def test_noise_is_bit_identical_to_the_reference_formula():
    g = torch.Generator().manual_seed(5)
    seed, frame, *_ = _random_rows(g, 33)
    K, V = 5, 301
    tokens = torch.randint(0, V, (33, 17), generator=g)
    whole, lazy = FrameNoise(seed, frame, K, V, whole=True), FrameNoise(seed, frame, K, V, whole=False)
    assert whole.table is not None and lazy.table is None
    for cb in range(K):
        ref = _ref_counter_noise(seed, frame, cb, V)
        assert torch.equal(counter_noise(seed, frame, cb, V), ref)
        assert torch.equal(whole.log_at(cb, tokens), ref.gather(-1, tokens).log())
        assert torch.equal(lazy.log_at(cb, tokens), ref.gather(-1, tokens).log())


def test_sampler_is_bit_identical_to_the_reference_formulas():
    g = torch.Generator().manual_seed(6)
    K, V = 4, 2051
    for B, candidates, topk_off in [(64, None, False), (64, 64, False), (64, None, True), (1, 64, False)]:
        seed, frame, temperature, topk, topp = _random_rows(g, B)
        if topk_off:
            topk[::2] = 0
        for whole in (True, False):
            noise = FrameNoise(seed, frame, K, V, whole=whole)
            rows = row_params(temperature, topk, topp, V, candidates)
            for cb in range(K):
                logits = torch.randn(B, V, generator=g) * 3
                logits[:, 7] = logits[:, 3]  # a tie
                ref = _ref_sample(logits, _ref_counter_noise(seed, frame, cb, V), temperature, topk, topp, candidates)
                assert torch.equal(pick(logits, functools.partial(noise.log_at, cb), rows), ref)
                assert torch.equal(sample(logits, counter_noise(seed, frame, cb, V), temperature, topk, topp,
                                          candidates), ref)
