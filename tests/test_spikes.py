"""Spike skipping in skip_and_round, against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgclip_optax as rgc

# Norms with spikes at steps 6 and 12 and a NaN step at 9.
NORMS = [3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 40.0, 3.1, 2.8, np.nan, 3.0, 3.2, 25.0, 3.1]


def chain(**spikes):
    return rgc.skip_and_round(
        optax.chain(
            rgc.scale_by_delta_gclip(1.0, 0.1, wide_updates=True),
            optax.scale_by_adam(),
            optax.scale_by_learning_rate(0.01),
        ),
        **spikes,
    )


def reference(norms, losses, sigmas, window, warmup):
    """Which steps are spikes: above the mean + sigmas * std (population) of
    the last `window` values of steps taken, once `warmup` were taken."""
    taken_n, taken_l, spikes = [], [], []
    for n, loss in zip(norms, losses):
        spike = False
        if np.isfinite(n) and len(taken_n) >= warmup:
            recent = np.array(taken_n[-window:])
            spike = n > recent.mean() + sigmas * recent.std()
            if loss is not None:
                recent_l = np.array(taken_l[-window:])
                spike = spike or loss > recent_l.mean() + sigmas * recent_l.std()
        spikes.append(bool(spike))
        if np.isfinite(n) and not spike:
            taken_n.append(n)
            taken_l.append(loss)
    return spikes


def run(tx, norms, losses=None):
    params = jnp.zeros(2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for i, n in enumerate(norms):
        extra = {} if losses is None else {"value": jnp.float32(losses[i])}
        u, state = update(jnp.array([n, 0.0], jnp.float32), state, params, **extra)
        out.append((u, state))
    return out


@pytest.mark.parametrize("window,warmup", [(4, 3), (8, 5), (128, 5)])
def test_spikes_in_the_norm_follow_the_reference(window, warmup):
    got = run(chain(spike_sigmas=3.0, spike_window=window, spike_warmup=warmup), NORMS)
    want = reference(NORMS, [None] * len(NORMS), 3.0, window, warmup)
    counts = [int(s.spikes.spike_count) for _, s in got]
    assert counts == list(np.cumsum(want)), (counts, want)
    assert sum(want) >= 1
    for (u, s), spike, n in zip(got, want, NORMS):
        if spike or not np.isfinite(n):
            np.testing.assert_array_equal(np.asarray(u), 0.0)
    # The NaN step is the rule's, not a spike.
    assert int(optax.tree.get(got[-1][1], "nonfinite_count")) == 1


def test_a_spike_holds_the_whole_state():
    got = run(chain(spike_sigmas=3.0, spike_window=8, spike_warmup=5), NORMS)
    adam_counts = [int(s.inner[1].count) for _, s in got]
    # Steps 6 (spike) and 9 (NaN) and 12 (spike) leave Adam's count alone.
    assert adam_counts == [1, 2, 3, 4, 5, 6, 6, 7, 8, 8, 9, 10, 10, 11]
    before, after = got[5][1].inner[1], got[6][1].inner[1]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_spikes_in_the_loss_are_skipped_too():
    norms = [3.0] * 8
    losses = [1.0, 1.1, 0.9, 1.0, 1.05, 9.0, 1.0, 0.95]
    got = run(chain(spike_sigmas=3.0, spike_window=8, spike_warmup=4), norms, losses)
    want = reference(norms, losses, 3.0, 8, 4)
    assert want == [False] * 5 + [True, False, False]
    assert [int(s.spikes.spike_count) for _, s in got] == list(np.cumsum(want))


def test_the_windows_take_in_only_the_steps_taken():
    got = run(chain(spike_sigmas=3.0, spike_window=8, spike_warmup=5), NORMS)
    state = got[-1][1].spikes
    taken = [n for n, s in zip(NORMS, reference(NORMS, [None] * 14, 3.0, 8, 5))
             if np.isfinite(n) and not s]  # fmt: skip
    assert int(state.seen) == len(taken)
    ring = np.asarray(state.norms)
    expected = np.full(8, np.nan)
    for i, n in enumerate(taken):
        expected[i % 8] = n
    np.testing.assert_allclose(ring, expected, rtol=1e-6)


def test_without_spike_skipping_the_state_is_the_inner_chains():
    tx = chain()
    state = tx.init(jnp.zeros(2))
    assert not isinstance(state, rgc.SkipAndRoundState)
    assert isinstance(state[0], rgc.DeltaGClipState)


def test_spike_skipping_compiles_into_a_scan_and_vmaps():
    tx = chain(spike_sigmas=4.0, spike_window=16, spike_warmup=4)

    def train(w0):
        def step(carry, t):
            w, s = carry
            g = jax.grad(lambda w: jnp.sum((w - 3.0) ** 2))(w)
            g = jnp.where(t == 20, g * 1e4, g)  # one injected outlier
            u, s = tx.update(g, s, w)
            return (optax.apply_updates(w, u), s), None

        (_, s), _ = jax.lax.scan(step, (w0, tx.init(w0)), jnp.arange(40))
        return s.spikes.spike_count

    counts = jax.jit(jax.vmap(train))(jnp.stack([jnp.zeros(3), jnp.ones(3)]))
    np.testing.assert_array_equal(np.asarray(counts), [1, 1])


BAD_SPIKE_OPTIONS = [
    ({"spike_sigmas": 0.0},
     r"spike_sigmas must be in \(0, inf\), got spike_sigmas=0.0"),
    ({"spike_sigmas": 3.0, "spike_window": 1},
     r"spike_window must be an int >= 2, got spike_window=1"),
    ({"spike_sigmas": 3.0, "spike_window": 8, "spike_warmup": 9},
     r"spike_warmup must be in \[2, spike_window=8\], got spike_warmup=9"),
    ({"spike_sigmas": 3.0, "spike_warmup": 1.5}, r"spike_warmup must be an int"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, message", BAD_SPIKE_OPTIONS)
def test_bad_spike_options_are_refused_with_their_name_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        chain(**kwargs)
