"""What the optimizer adds to the loop body of a scan-compiled training run.

The program is ``benchmarks/whole_program.py``'s (updates x epochs x
minibatches, all scanned), shrunk, as ``jit(train)`` and ``jit(vmap(train))``.
Inside its step loop, δ-GClip must add no conditional or loop on the
accelerator paths (forced on this CPU), only the overflow rescue's one on
XLA:CPU, and no copy of a loop-carried buffer: a copy there means that some
update read a buffer after the step had overwritten it in place, which XLA
pays for on every step. The counts are read from the optimized HLO; nothing
is timed.
"""

import sys
from pathlib import Path

import jax
import optax
import pytest

import rgclip_optax as rgc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import whole_program  # noqa: E402

from tests.tpu import needs_tpu_python, run_benchmark  # noqa: E402

SMALL = [
    "--sizes", "4", "16", "2", "--updates", "2", "--epochs", "1",
    "--minibatches", "2", "--minibatch-size", "8",
]  # fmt: skip


def step_loop(name, seeds=1):
    args = whole_program.parse_args(SMALL)
    train = whole_program.make_train(whole_program.make_tx(name, args), args)
    keys = jax.random.split(jax.random.key(0), seeds)
    fn = jax.jit(jax.vmap(train)) if seeds > 1 else jax.jit(train)
    compiled = fn.lower(keys if seeds > 1 else keys[0]).compile()
    return whole_program.step_loop_counts(compiled.as_text())


PAIRS = [("delta_gclip", "clip_sgd"), ("delta_gclip_momentum", "clip_sgd_momentum")]


@pytest.mark.parametrize("path", ["tpu", "gpu"])
@pytest.mark.parametrize("ours,peer", PAIRS)
def test_accelerator_paths_add_no_control_flow_or_copy_to_the_loop(path, ours, peer):
    with rgc.target_platform(path):
        got, base = step_loop(ours), step_loop(peer)
    assert base["fusion"] > 0  # the step loop was found
    assert got["conditional"] == 0 and got["while"] == 0, got
    assert got["carried_copy"] <= base["carried_copy"], (got, base)
    assert got["copy"] <= base["copy"], (got, base)


@pytest.mark.parametrize("seeds", [1, 2])
@pytest.mark.parametrize("ours,peer", PAIRS)
def test_xla_cpu_loop_has_only_the_rescue_conditional_and_no_carried_copy(
    seeds, ours, peer
):
    # XLA:CPU's own path: one conditional (the rescaled sums, run only when
    # the float32 sum is not finite), also vmapped over seeds, and no copy
    # of a carried buffer. The branch returning the plain sums copies its
    # scalar operand: one copy more, outside the carry.
    got, base = step_loop(ours, seeds), step_loop(peer, seeds)
    assert got["conditional"] == 1 and got["while"] == 0, got
    assert got["carried_copy"] <= base["carried_copy"], (got, base)
    assert got["copy"] <= base["copy"] + 1, (got, base)


def test_the_chain_in_front_of_adam_adds_no_control_flow():
    # skip_and_round holds Adam's moments with selects between the old and
    # the new ones; the parameter update reads the old moments to recompute
    # the new, so XLA copies the held ones (every moment on XLA:CPU, the bias
    # moments on XLA:TPU; see docs/performance.md). No control flow, though.
    with rgc.target_platform("tpu"):
        got = step_loop("delta_gclip_adam")
    assert got["conditional"] == 0 and got["while"] == 0, got


def _skip_from_counts(inner):
    """skip_and_round, but telling a skipped step from the rule's counts."""
    from rgclip_optax._skip_and_round import hold_state, round_updates
    from rgclip_optax._state import find_rule_state

    def update(g, s, p=None, **extra):
        u, new = inner.update(g, s, p, **extra)
        old_count = find_rule_state(s, "test").nonfinite_count
        skipped = find_rule_state(new, "test").nonfinite_count != old_count
        return round_updates(skipped, u, g), hold_state(skipped, new, s)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def test_a_copy_of_a_carried_buffer_is_seen(monkeypatch):
    # The control: with the skip told from the old and new counts instead of
    # the state's flag, every parameter update reads the old count, and
    # XLA:CPU copies the carried count in the loop body.
    from rgclip_optax import _alias

    base = step_loop("clip_sgd")
    assert step_loop("delta_gclip")["carried_copy"] == base["carried_copy"]
    monkeypatch.setattr(
        _alias,
        "_without_momentum",
        lambda rule, lr: _skip_from_counts(
            optax.chain(rule, optax.scale_by_learning_rate(lr))
        ),
    )
    assert step_loop("delta_gclip")["carried_copy"] > base["carried_copy"]


@needs_tpu_python
def test_tpu_programs_meet_the_loop_targets(tmp_path):
    # The benchmark's --compile-for tpu on the small program: no control flow
    # and no extra copy in the step loop for delta_gclip and its momentum
    # variant, alone and vmapped over 2 seeds. Bytes are the benchmark's
    # check on its 9k-parameter program: in this 100-parameter one, the
    # rule's scalar arithmetic (each scalar padded to a 512-byte tile in
    # XLA:TPU's cost model) outweighs the arrays.
    record = run_benchmark(
        "whole_program.py", tmp_path / "tpu", "--compile-for", "tpu",
        "--seeds", "2", *SMALL, "--optimizers", "clip_sgd", "delta_gclip",
        "clip_sgd_momentum", "delta_gclip_momentum",
    )  # fmt: skip
    ours = [r for r in record["rows"] if r["optimizer"].startswith("delta")]
    assert len(ours) == 4
    for r in ours:
        assert set(r["failed"]) <= {"bytes"}, r
        assert r["step_loop"]["conditional"] == r["step_loop"]["while"] == 0
