"""Adaptive thresholds: the running statistics against NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rgclip_optax as rgc

# Norms with a spike (at step 7) and a skipped, non-finite step (at step 9).
NORMS = [3.0, 5.0, 4.0, 6.0, 5.5, 4.5, 5.0, 80.0, 5.0, np.nan, 4.0, 6.0, 5.0]


def run(gamma, norms, delta=0.1):
    """The rule's logged threshold and factor at each step, for gradients
    of the given norms."""
    tx = rgc.scale_by_delta_gclip(gamma, delta)
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    thresholds, scales, stats = [], [], []
    for n in norms:
        _, state = update(jnp.array([n, 0.0], jnp.float32), state)
        thresholds.append(float(state.threshold))
        scales.append(float(state.scale))
        stats.append(state.threshold_stats)
    return thresholds, scales, stats


def zscore_reference(norms, z, decay, warmup, initial):
    """ZClip's statistics in float64 NumPy: plain mean/variance over the
    warm-up, then moving averages of the clipped norm; a NaN norm is not
    taken in."""
    seen, mean, var = [], 0.0, 0.0
    thresholds = []
    for n in norms:
        gamma = initial if len(seen) < warmup else mean + z * math.sqrt(var)
        thresholds.append(gamma)
        if not np.isfinite(n):
            continue
        if len(seen) < warmup:
            seen.append(n)
            mean, var = float(np.mean(seen)), float(np.var(seen))
        else:
            seen.append(n)
            c = min(n, gamma)
            mean = decay * mean + (1 - decay) * c
            var = decay * var + (1 - decay) * (c - mean) ** 2
    return thresholds


def percentile_reference(norms, q, window, warmup, initial):
    seen, thresholds = [], []
    for n in norms:
        recent = seen[-window:]
        gamma = initial if len(seen) < warmup else float(np.percentile(recent, q))
        thresholds.append(gamma)
        if np.isfinite(n):
            seen.append(n)
    return thresholds


def factor(norm, gamma, delta):
    if not np.isfinite(norm):
        return 0.0  # a skipped step logs 0
    return 1.0 if norm <= gamma else min(1.0, max(delta, gamma / norm))


@pytest.mark.parametrize("warmup", [1, 3, 6])
def test_zscore_threshold_follows_the_reference(warmup):
    gamma = rgc.zscore_gamma(2.0, 0.9, warmup=warmup, initial=4.0)
    got, scales, _ = run(gamma, NORMS)
    want = zscore_reference(NORMS, 2.0, 0.9, warmup, 4.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        scales, [factor(n, g, 0.1) for n, g in zip(NORMS, want)], rtol=1e-5
    )


@pytest.mark.parametrize("window", [1, 4, 50])
def test_percentile_threshold_follows_the_reference(window):
    gamma = rgc.percentile_gamma(30, window=window, warmup=2, initial=math.inf)
    got, scales, _ = run(gamma, NORMS)
    want = percentile_reference(NORMS, 30, window, 2, math.inf)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        scales, [factor(n, g, 0.1) for n, g in zip(NORMS, want)], rtol=1e-5
    )


def test_the_warmup_uses_the_initial_threshold_and_no_clipping_by_default():
    got, scales, _ = run(rgc.zscore_gamma(warmup=5), NORMS[:5])
    assert got == [math.inf] * 5 and scales == [1.0] * 5


def test_a_skipped_step_leaves_the_statistics_as_they_were():
    for gamma in (rgc.zscore_gamma(warmup=2), rgc.percentile_gamma(warmup=2)):
        _, _, stats = run(gamma, [3.0, 5.0, np.inf, np.nan, 4.0])
        for before, after in ((stats[1], stats[2]), (stats[2], stats[3])):
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(stats[4].seen) == 3


def test_a_spike_is_clipped_and_does_not_inflate_the_zscore_threshold():
    gamma = rgc.zscore_gamma(2.0, 0.9, warmup=6, initial=4.0)
    got, scales, _ = run(gamma, NORMS)
    spike = NORMS.index(80.0)
    assert scales[spike] < 0.2  # clipped hard
    # Taken in at the threshold, not at 80: the next threshold stays near.
    assert got[spike + 1] < 1.5 * got[spike]


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(1e-3, 1e4), min_size=1, max_size=30),
    st.floats(0.0, 1.0),
    st.sampled_from(["zscore", "percentile"]),
)
def test_the_step_size_stays_between_eta_delta_and_eta(norms, delta, mode):
    gamma = (
        rgc.zscore_gamma(warmup=3, initial=1.0)
        if mode == "zscore"
        else rgc.percentile_gamma(20, window=8, warmup=3, initial=1.0)
    )
    _, scales, _ = run(gamma, norms, delta=delta)
    for s in scales:
        assert delta * (1 - 1e-6) <= s <= 1.0


def test_the_optimizer_with_an_adaptive_threshold_trains_and_vmaps():
    # A scan-compiled run, vmapped over two starting points: the state is a
    # scan carry (dtypes and structure stable) and the loss falls.
    tx = rgc.delta_gclip(0.1, rgc.zscore_gamma(warmup=3), 0.1, momentum=0.5)

    def train(w0):
        def step(carry, _):
            w, s = carry
            g = jax.grad(lambda w: jnp.sum((w - 3.0) ** 2))(w)
            u, s = tx.update(g, s, w)
            return (optax.apply_updates(w, u), s), None

        (w, s), _ = jax.lax.scan(step, (w0, tx.init(w0)), length=60)
        return jnp.sum((w - 3.0) ** 2), rgc.read_clip_state(s).threshold

    losses, thresholds = jax.jit(jax.vmap(train))(
        jnp.stack([jnp.zeros(4), -jnp.ones(4)])
    )
    assert np.all(np.asarray(losses) < 1e-2)
    assert np.all(np.isfinite(np.asarray(thresholds)))


def test_read_clip_state_gives_the_threshold_and_its_statistics():
    tx = rgc.delta_gclip(0.1, rgc.percentile_gamma(50, window=4, warmup=1), 0.1)
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([3.0, 4.0]), state, jnp.zeros(2))
    log = rgc.read_clip_state(state)
    assert float(log.threshold) == math.inf  # the first step: still warming up
    assert isinstance(log.threshold_stats, rgc.PercentileStats)
    assert int(log.threshold_stats.seen) == 1
    np.testing.assert_allclose(np.asarray(log.threshold_stats.history)[0], 5.0)


@pytest.mark.parametrize("norm", ["global", "per_tensor"])
def test_a_fixed_threshold_is_logged_as_init_wrote_it_and_an_injected_one_per_step(
    norm,
):
    # A concrete gamma is carried from init unchanged: in the compiled step
    # the field is its input, not a new output (see fixed_threshold).
    tx = rgc.scale_by_delta_gclip(2.5, 0.1, norm=norm)
    step = jax.jit(lambda g, s: tx.update(g, s)[1])
    state = step(jnp.array([30.0, 40.0]), tx.init(jnp.zeros(2)))
    assert float(rgc.read_clip_state(state).threshold) == 2.5
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s)[1])(jnp.ones(2), state)
    out_threshold = jaxpr.jaxpr.outvars[-1]  # threshold_stats is () here
    assert out_threshold in jaxpr.jaxpr.invars
    # Under inject_hyperparams gamma is a JAX array (traced under jit, concrete
    # without): each step logs its own.
    injected = optax.inject_hyperparams(rgc.scale_by_delta_gclip)(gamma=2.5, delta=0.1)
    state = injected.init(jnp.zeros(2))
    for update in (jax.jit(injected.update), injected.update):  # traced or not
        for gamma in (4.0, 7.0):
            state.hyperparams["gamma"] = jnp.asarray(gamma)
            _, state = update(jnp.array([30.0, 40.0]), state)
            assert float(rgc.read_clip_state(state).threshold) == gamma


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: rgc.zscore_gamma(z=0.0), r"z must be in \(0, inf\), got z=0.0"),
        (lambda: rgc.zscore_gamma(decay=1.0), r"decay must be in \[0, 1\), got"),
        (
            lambda: rgc.zscore_gamma(warmup=0),
            r"warmup must be an int >= 1, got warmup=0",
        ),
        (lambda: rgc.zscore_gamma(warmup=2.5), r"warmup must be an int >= 1"),
        (lambda: rgc.zscore_gamma(initial=-1.0), r"initial must be in \(0, inf\]"),
        (lambda: rgc.percentile_gamma(q=0.0), r"q must be in \(0, 100\], got q=0.0"),
        (
            lambda: rgc.percentile_gamma(q=101.0),
            r"q must be in \(0, 100\], got q=101.0",
        ),
        (lambda: rgc.percentile_gamma(window=0), r"window must be an int >= 1"),
        (
            lambda: rgc.delta_gclip(0.1, rgc.zscore_gamma(), norm="per_tensor"),
            r"needs norm='global', got norm='per_tensor'",
        ),
    ],
)
def test_bad_arguments_are_refused_with_their_name_and_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()
