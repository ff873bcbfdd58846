"""Full optimizers: ``delta_gclip`` and ``gclip``.

Each is a chain of public parts in the style of ``optax.sgd``:

    skip_and_round(chain(scale_by_delta_gclip(..., wide_updates=True), [trace],
                         scale_by_learning_rate))

so any optax schedule works as the learning rate, a step whose gradient is not
finite is skipped as a whole, and a low-precision update is rounded once. Both
compute that chain in one function with its state: with momentum,
``_with_momentum`` holds the trace in the same pass, which is faster on
XLA:CPU; without, ``_without_momentum`` zeroes a skipped step's updates once,
not twice, which is cheaper to compile.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from rgclip_optax import _validation
from rgclip_optax._delta_gclip import scale_by_delta_gclip, wide_dtype
from rgclip_optax._skip_and_round import hold_state, round_updates
from rgclip_optax._sums import AxisName


def _decayed(g: jax.Array, t: jax.Array, decay: jax.Array) -> jax.Array:
    """``g + decay * t`` in float32 or wider, with explicit conversions: JAX
    promotes float8 to nothing implicitly."""
    wide = jnp.promote_types(wide_dtype(g.dtype), wide_dtype(t.dtype))
    return g.astype(wide) + decay.astype(wide) * t.astype(wide)


def _without_momentum(
    rule: optax.GradientTransformation, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformationExtraArgs:
    """``skip_and_round(optax.chain(rule, scale_by_learning_rate))`` with one
    zeroing of a skipped step's updates instead of two.

    The rule already outputs zeros on a skipped step, and the learning rate
    keeps them zero, so :func:`skip_and_round`'s own zeroing (there for links
    that make something else of zeros, such as a momentum trace) is left out:
    its selects or bit masks were a quarter of the step's jaxpr on a 291-leaf
    decoder (4,872 equations against 3,707; ``benchmarks/build_cost.py``). The
    state is that chain's; the schedule's count is held on a skipped step;
    the updates are cast once to the gradient's dtypes. A skipped update is
    ``-0.0`` (the learning rate times ``+0``) where the chain gives ``+0``.
    """
    lr = optax.with_extra_args_support(optax.scale_by_learning_rate(learning_rate))
    init_fn = optax.chain(rule, lr).init

    def update_fn(
        updates: Any, state: tuple[Any, ...], params: Any = None, **extra_args: Any
    ) -> tuple[Any, tuple[Any, ...]]:
        rule_old, lr_old = state
        u, rule_new = rule.update(updates, rule_old, params)
        u, lr_new = lr.update(u, lr_old, params, **extra_args)
        held = (rule_new, hold_state(rule_new.skipped, lr_new, lr_old))
        return round_updates(None, u, updates), held

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_momentum(
    rule: optax.GradientTransformation,
    momentum: chex.Numeric,
    nesterov: bool,
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
    """``skip_and_round(optax.chain(rule, optax.trace(momentum, nesterov),
    scale_by_learning_rate))``, with the trace held in the same pass.

    In float32 its results are those of that chain of public parts up to XLA's
    rounding of a differently fused program (tested), and a held -0 in the
    trace may come back as +0; in lower precision the update reads the trace
    as stored (rounded to the parameters' dtype), as ``optax.sgd`` does. The
    state is that chain's state, so checkpoints and ``optax.tree.get`` see the
    usual ``TraceState`` and schedule count.

    It exists for speed: :func:`skip_and_round` holds a skipped step's state
    with a select between the old and the new trace, and the update reads the
    new trace, computed from the old one; XLA:CPU (jax 0.10.2) then copies
    every momentum buffer before the held trace is written in place
    (tests/test_xla_lowering.py::test_momentum_step_copies_no_momentum_buffer).

    * Dtypes: the rule hands its updates on in float32 (momentum and learning
      rate are applied at that precision), and they are cast here, once, to
      each gradient leaf's dtype; every state leaf keeps its dtype from the
      step before. So a bfloat16 update is rounded once, not after each link,
      and a float32 hyperparameter traced by ``optax.inject_hyperparams``
      cannot make the state's dtypes drift between steps.
    * Skips: the rule counts a skipped step in ``nonfinite_count`` and
      outputs exact zeros; the updates are then zero and the rest of the state
      is held, as ``optax.apply_if_finite`` does, from the flag the norm
      already computed. The momentum is held by decaying it by 1 instead of
      ``momentum`` (``0 + 1 * trace`` is the trace): with a select between
      the old and the new trace instead, the parameter update read the old
      trace after the held one was written in place, and XLA copied every
      momentum buffer first (42.7 MB of temporaries for a float32 ResNet-18
      on XLA:CPU).
    """
    trace_link = optax.trace(decay=momentum, nesterov=nesterov)
    lr = optax.with_extra_args_support(optax.scale_by_learning_rate(learning_rate))
    # For the state's structure; update_fn runs the links itself.
    init_fn = optax.chain(rule, trace_link, lr).init

    def update_fn(
        updates: Any, state: tuple[Any, ...], params: Any = None, **extra_args: Any
    ) -> tuple[Any, tuple[Any, ...]]:
        rule_old, trace_old, lr_old = state
        u, rule_new = rule.update(updates, rule_old, params)
        skipped = rule_new.skipped
        old = trace_old.trace
        decay = jnp.where(skipped, 1.0, jnp.asarray(momentum, jnp.float32))
        no_grad = lambda x: x is None  # noqa: E731
        # The update reads the trace as stored (in the parameters' dtype, as
        # optax.sgd's does): from the unrounded float32 trace, XLA recomputed
        # it from the old trace and copied a narrow trace first.
        trace = jax.tree.map(
            lambda g, t: None if g is None else _decayed(g, t, decay).astype(t.dtype),
            u,
            old,
            is_leaf=no_grad,
        )
        if nesterov:
            u = jax.tree.map(
                lambda g, t: None if g is None else _decayed(g, t, decay),
                u,
                trace,
                is_leaf=no_grad,
            )
        else:  # back to float32 for the learning rate
            u = jax.tree.map(
                lambda g, t: None if g is None else t.astype(g.dtype),
                u,
                trace,
                is_leaf=no_grad,
            )
        # A parameter with no gradient (an Equinox integer buffer) keeps its
        # trace from init, where optax.trace would store None: the state keeps
        # one structure, as a scan or loop carry must.
        trace = jax.tree.map(
            lambda n, o: o if n is None else n, trace, old, is_leaf=no_grad
        )
        u, lr_new = lr.update(u, lr_old, params, **extra_args)
        trace_new = optax.TraceState(trace=trace)
        held = (rule_new, trace_new, hold_state(skipped, lr_new, lr_old))
        return round_updates(skipped, u, updates), held

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def delta_gclip(
    learning_rate: optax.ScalarOrSchedule,
    gamma: chex.Numeric,
    delta: chex.Numeric = 1e-3,
    *,
    weight_decay: chex.Numeric | None = None,
    mask: Any = None,
    momentum: chex.Numeric | None = None,
    nesterov: bool = False,
    skip_nonfinite: bool = True,
    norm: str = "global",
    axis_name: AxisName = None,
    replicated: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""δ-regularized gradient clipping (δ-GClip), the full optimizer.

    .. math::

      w \leftarrow w - h\,(g + \lambda w), \qquad
      h = \eta\,\min\left(1,\ \max\left(\delta,\ \frac{\gamma}{\|g\|}\right)\right)

    where :math:`\|g\|` is the global L2 norm of the raw gradient and
    :math:`\lambda` the weight decay, scaled by the same :math:`h` as in the
    authors' reference implementation. The step size always satisfies
    :math:`\eta\delta \le h \le \eta`: that floor is what lets Tucat et al.
    prove convergence to a global minimum for wide networks, where plain
    clipping (``delta = 0``, :func:`gclip`) can stall.

    The optimizer is the chain of public parts
    ``skip_and_round(optax.chain(scale_by_delta_gclip(..., wide_updates=True),
    [optax.trace(...)], optax.scale_by_learning_rate(...)))`` (computed in one
    function, with that chain's state and results), with the rule's
    :class:`DeltaGClipState` first, so
    ``optax.tree.get(state, "grad_norm")`` and ``"scale"`` read the norm and the
    factor ``h / learning_rate`` for logging. With ``momentum``, the scaled
    gradient feeds an ``optax.trace`` (heavy-ball or Nesterov), as in
    ``optax.sgd``; the convergence theorem covers the momentum-free method.

    Args:
      learning_rate: :math:`\eta > 0`, a float or an optax schedule.
      gamma: the clipping threshold :math:`\gamma > 0`.
      delta: the floor :math:`\delta \in [0, 1]`; 0 is GClip, 1 is SGD.
      weight_decay: :math:`\lambda \ge 0`, added to the gradient after the norm
        is taken and scaled by the same :math:`h`; ``None`` (the default): no
        weight decay (see :func:`scale_by_delta_gclip`).
      mask: which parameters ``weight_decay`` applies to: a pytree of bools
        with the parameters' structure, or a callable returning one from the
        parameters, as in :func:`optax.add_decayed_weights`; ``None`` decays
        all. See :func:`scale_by_delta_gclip`.
      momentum: ``None`` (no momentum, the paper's method) or a decay in
        [0, 1).
      nesterov: use Nesterov momentum (needs ``momentum``).
      skip_nonfinite: if true (the default), a step whose gradient has a NaN or
        an infinity leaves the parameters and all optimizer state unchanged
        and is counted in ``nonfinite_count``; if false the formula's result
        is propagated.
      norm: ``"global"`` (the paper's method) or ``"per_tensor"`` (each leaf
        its own norm and step size; not covered by the convergence theorem);
        see :func:`scale_by_delta_gclip`.
      axis_name: inside ``shard_map``/``pmap``, the mesh axis (or axes) over
        which the gradient leaves are sharded; see
        :func:`scale_by_delta_gclip`.
      replicated: with ``axis_name``, the leaves replicated on every device;
        see :func:`scale_by_delta_gclip`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: for concrete hyperparameters out of range (the message names
        the parameter, its value and the allowed range).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import rgclip_optax as rgc
      >>> params = {"w": jnp.ones(3)}
      >>> loss = lambda p: 100.0 * jnp.sum(p["w"] ** 2)
      >>> tx = rgc.delta_gclip(learning_rate=0.1, gamma=1.0, delta=0.01)
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss)(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> round(float(optax.tree.get(state, "grad_norm")), 2)
      346.41
      >>> round(float(optax.tree.get(state, "scale")), 5)  # 1/346.41 < delta
      0.01

    References:
      Tucat, Mukherjee, Sen, Sun, Rivasplata, `Regularized Gradient Clipping
      Provably Trains Wide and Deep Neural Networks
      <https://arxiv.org/abs/2404.08624>`_, TMLR 2025.
    """
    _validation.check_learning_rate(learning_rate)
    _validation.check_bool("nesterov", nesterov)
    if momentum is not None:
        _validation.check_interval("momentum", momentum, 0.0, 1.0, high_closed=False)
    elif nesterov:
        raise ValueError(
            "nesterov=True needs momentum: got momentum=None. Pass momentum in "
            "[0, 1), e.g. momentum=0.9."
        )
    rule = scale_by_delta_gclip(
        gamma,
        delta,
        skip_nonfinite=skip_nonfinite,
        norm=norm,
        axis_name=axis_name,
        replicated=replicated,
        weight_decay=weight_decay,
        mask=mask,
        wide_updates=True,
    )
    if momentum is not None:
        return _with_momentum(rule, momentum, nesterov, learning_rate)
    return _without_momentum(rule, learning_rate)


def gclip(
    learning_rate: optax.ScalarOrSchedule,
    gamma: chex.Numeric,
    *,
    weight_decay: chex.Numeric | None = None,
    mask: Any = None,
    momentum: chex.Numeric | None = None,
    nesterov: bool = False,
    skip_nonfinite: bool = True,
    norm: str = "global",
    axis_name: AxisName = None,
    replicated: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient clipping (GClip): :func:`delta_gclip` with ``delta = 0``.

    .. math::

      w \leftarrow w - h\,g, \qquad
      h = \eta\,\min\left(1,\ \frac{\gamma}{\|g\|}\right)

    The same as ``optax.chain(optax.clip_by_global_norm(gamma),
    optax.sgd(learning_rate))``, but with a float32 norm, logged
    ``grad_norm``/``scale`` state, input checks and skipping of non-finite
    steps. Without the δ floor, the step size shrinks like
    :math:`\gamma/\|g\|` on steep losses and training can stall.

    Args:
      learning_rate: :math:`\eta > 0`, a float or an optax schedule.
      gamma: the clipping threshold :math:`\gamma > 0`.
      weight_decay: see :func:`delta_gclip`.
      mask: see :func:`delta_gclip`.
      momentum: see :func:`delta_gclip`.
      nesterov: see :func:`delta_gclip`.
      skip_nonfinite: see :func:`delta_gclip`.
      norm: see :func:`delta_gclip`.
      axis_name: see :func:`delta_gclip`.
      replicated: see :func:`delta_gclip`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> import rgclip_optax as rgc
      >>> tx = rgc.gclip(learning_rate=1.0, gamma=1.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([30.0, 40.0]), state)
      >>> updates.round(6)  # the step has length learning_rate * gamma
      Array([-0.6, -0.8], dtype=float32)

    References:
      Zhang, He, Sra, Jadbabaie, `Why gradient clipping accelerates training: A
      theoretical justification for adaptivity
      <https://arxiv.org/abs/1905.11881>`_, ICLR 2020.
    """
    return delta_gclip(
        learning_rate,
        gamma,
        0.0,
        weight_decay=weight_decay,
        mask=mask,
        momentum=momentum,
        nesterov=nesterov,
        skip_nonfinite=skip_nonfinite,
        norm=norm,
        axis_name=axis_name,
        replicated=replicated,
    )
