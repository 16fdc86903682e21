"""Sampling draws from the right distribution, is reproducible, and every lean path (partial
top-k, no nucleus, no argmax, argmax only) picks exactly what the path with every filter picks."""

import functools

import torch

from fastcsm.engine.sampling import (
    FrameNoise,
    SamplingParams,
    SamplingPath,
    counter_noise,
    pick,
    row_key,
    row_params,
    sample,
)

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
    keep &= ((probs.cumsum(dim=-1) - probs) < topp[:, None]) | (topp[:, None] >= 1)  # topp 1: off
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
    whole, lazy = (FrameNoise(row_key(seed), frame, K, V, whole=w) for w in (True, False))
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
            noise = FrameNoise(row_key(seed), frame, K, V, whole=whole)
            path = SamplingPath(candidates)
            rows = row_params(temperature, topk, topp, V, path)
            for cb in range(K):
                logits = torch.randn(B, V, generator=g) * 3
                logits[:, 7] = logits[:, 3]  # a tie
                ref = _ref_sample(logits, _ref_counter_noise(seed, frame, cb, V), temperature, topk, topp, candidates)
                assert torch.equal(pick(logits, functools.partial(noise.log_at, cb), rows, path), ref)
                assert torch.equal(sample(logits, counter_noise(seed, frame, cb, V), temperature, topk, topp,
                                          candidates), ref)


def _rows_for(path, g, B):
    """Random rows of the kind `path` is chosen for: all greedy, all sampled or mixed; every
    topp 1 without the nucleus; every sampled top-k within the candidates."""
    seed, frame, temperature, topk, topp = _random_rows(g, B)
    temperature = temperature.clamp_min(0.05)  # sampled rows
    if path.greedy:
        temperature[::2 if path.sampled else 1] = 0.0
    if not path.nucleus:
        topp[:] = 1.0
    if path.candidates is None:
        topk[::4] = 0  # top-k off in some rows
    if path.sampled:  # a sampled row that needs the nucleus, and one that needs the full sort
        first = int((temperature > 0).nonzero()[0])
        topp[first] = 0.5 if path.nucleus else 1.0
        topk[first] = 0 if path.candidates is None else topk[first]
    return seed, frame, temperature, topk, topp


def test_every_path_picks_what_the_path_with_every_filter_picks():
    """For the rows `SamplingPath.of` chooses it for, a lean path (no nucleus, no argmax, only
    the argmax, partial top-k) picks bit for bit what `SamplingPath()` picks, which the reference
    formulas pick, in batches that mix temperatures, top-k, top-p and greedy rows."""
    g = torch.Generator().manual_seed(7)
    K, V = 3, 2051
    paths = SamplingPath.every(64)
    assert len(set(paths)) == 9
    for path in paths:
        for B in (1, 5, 64):
            if B == 1 and path.greedy and path.sampled:
                continue  # one row is either greedy or sampled
            seed, frame, temperature, topk, topp = _rows_for(path, g, B)
            params = [SamplingParams(float(t), int(k), float(p))
                      for t, k, p in zip(temperature, topk, topp, strict=True)]
            assert SamplingPath.of(params, 64) == path
            noise = FrameNoise(row_key(seed), frame, K, V)
            full, lean = SamplingPath(path.candidates), path
            rows_full = row_params(temperature, topk, topp, V, full)
            rows_lean = row_params(temperature, topk, topp, V, lean) if lean.sampled else None
            for cb in range(K):
                logits = torch.randn(B, V, generator=g) * 3
                logits[:, 7] = logits[:, 3]  # a tie
                log_noise = functools.partial(noise.log_at, cb)
                ref = _ref_sample(logits, _ref_counter_noise(seed, frame, cb, V), temperature, topk, topp,
                                  path.candidates)
                assert torch.equal(pick(logits, log_noise, rows_full, full), ref)
                assert torch.equal(pick(logits, log_noise, rows_lean, lean), ref), (path, B, cb)


def test_path_of_the_rows():
    sampled, greedy = SamplingParams(0.9, 50, 1.0), SamplingParams(0.0, 0, 0.5)
    assert SamplingPath.of([sampled], 64) == SamplingPath(64, nucleus=False, greedy=False)
    assert SamplingPath.of([sampled, greedy], 64) == SamplingPath(64, nucleus=False, greedy=True)  # its topp: moot
    assert SamplingPath.of([greedy, greedy], 64) == SamplingPath(None, nucleus=False, greedy=True, sampled=False)
    assert SamplingPath.of([SamplingParams(0.9, 0, 0.95)], 64) == SamplingPath(None, nucleus=True, greedy=False)
    assert SamplingPath.of([SamplingParams(0.9, 65, 1.0)], 64).candidates is None
    assert SamplingPath.of([sampled], 0).candidates is None
    assert set(SamplingPath.of(p, 64) for p in ([sampled], [sampled, greedy], [greedy])) <= set(SamplingPath.every(64))


def test_topp_one_is_off_even_where_the_prefix_mass_rounds_up_to_one():
    """In float32 the mass before a tail token can round to 1.0 (here: a token 16 nats below the
    best, which the race can still pick); topp = 1 keeps it, as the path without the nucleus does."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = torch.cat([torch.zeros(1), -torch.rand(63, generator=g) * 6 - 10])[None]
        probs = torch.softmax(logits.sort(descending=True).values, dim=-1)
        rounded = ((probs.cumsum(-1) - probs)[0] >= 1).nonzero()
        if len(rounded):
            break
    assert len(rounded), "no float32 case found"
    tail = int(logits[0].sort(descending=True).indices[rounded[0, 0]])
    noise = torch.ones(1, 64)
    noise[0, tail] = 1e-30  # its race score: logit + 69, far above the best token's
    p = params(1, 1.0, 0, 1.0)
    assert int(sample(logits, noise, *p)) == tail
    lean = SamplingPath(None, nucleus=False, greedy=False)
    log_noise = lambda order: noise.gather(-1, order).log()  # noqa: E731
    assert int(pick(logits, log_noise, row_params(*p, 64, lean), lean)) == tail
    assert int(sample(logits, noise, *params(1, 1.0, 0, 0.999))) == 0  # a real nucleus drops it
