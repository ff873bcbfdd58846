"""What the paper-reproduction examples share.

* the command line (``--optimizer``, ``--learning-rate``, ``--gamma``,
  ``--delta``, ``--epochs``, ``--batch-size``, ``--seed``, ``--schedule``,
  ``--data-dir``, ``--out``) with per-optimizer defaults;
* the optimizers and the step-decay schedule;
* the plumbing of the epoch loops (each example owns its loop): the epoch's
  batches, the per-step ``loss``, ``grad_norm`` and step size ``h`` gathered
  from jitted chunks, with their timing (:class:`StepLog`);
* the regime fractions of a log of gradient norms;
* the JSON record and the PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rgclip_optax as rgc

OPTIMIZERS = ("sgd", "adam", "gclip", "delta_gclip")
# The schedule multiplies eta by 0.1 at these fractions of the run (epochs 100
# and 150 of the paper's 200).
DECAY_AT = (0.5, 0.75)
DECAY_FACTOR = 0.1

Defaults = Mapping[str, Mapping[str, float]]

# PyTorch's default initialization of nn.Linear and nn.Conv2d, which the
# authors' models use: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_KERNEL_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """An initializer drawing U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    defaults: Defaults,
    epochs: int,
    batch_size: int,
    data_dir: Path | None,
    out: Path,
    schedule: bool,
) -> None:
    """Adds the flags every example takes; hyperparameters default per optimizer."""
    shown = "; ".join(
        f"{name}: " + ", ".join(f"{k}={v:g}" for k, v in hp.items())
        for name, hp in defaults.items()
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="delta_gclip",
        help=f"optimizer (default delta_gclip). Defaults per optimizer: {shown}",
    )
    parser.add_argument("--learning-rate", type=float, help="eta (peak value)")
    parser.add_argument("--gamma", type=float, help="clipping threshold (clip only)")
    parser.add_argument("--delta", type=float, help="δ floor (delta_gclip only)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--schedule",
        action=argparse.BooleanOptionalAction,
        default=schedule,
        help="multiply eta by 0.1 at 50%% and 75%% of the epochs "
        "(epochs 100 and 150 of 200), for every optimizer alike",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=data_dir,
        required=data_dir is None,
        help="dataset directory" + (f" (default {data_dir})" if data_dir else ""),
    )
    parser.add_argument("--out", type=Path, default=out, help="output directory")
    parser.add_argument(
        "--steps-per-call",
        type=int,
        default=50,
        help="training steps per jitted call (at most; a divisor of the epoch)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")


def check_positive_ints(
    parser: argparse.ArgumentParser, args: argparse.Namespace, flags: Sequence[str]
) -> None:
    """Exits with ``--flag must be a positive integer, got N`` for the first
    of ``flags`` (attribute names) below 1."""
    for flag in flags:
        if getattr(args, flag) < 1:
            parser.error(
                f"--{flag.replace('_', '-')} must be a positive integer, got "
                f"{getattr(args, flag)}"
            )


def override_hyperparameters(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    defaults: Defaults,
    keys: Sequence[str] = ("learning_rate", "gamma", "delta"),
) -> dict[str, float]:
    """The optimizer's default hyperparameters, with the flags among ``keys``
    that were given; a flag the optimizer does not take exits with a message."""
    name = args.optimizer
    hp = dict(defaults[name])
    for key in keys:
        value = getattr(args, key)
        if value is None:
            continue
        if key not in hp:
            parser.error(
                f"--{key.replace('_', '-')}={value} does not apply to "
                f"--optimizer={name}; it takes "
                + ", ".join(f"--{k.replace('_', '-')}" for k in hp)
            )
        hp[key] = value
    return hp


def resolve_hyperparameters(
    parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: Defaults
) -> dict[str, float]:
    """Fills unset hyperparameters from the optimizer's defaults; checks them."""
    hp = override_hyperparameters(parser, args, defaults)
    check_positive_ints(parser, args, ("epochs", "batch_size", "steps_per_call"))
    try:  # the library's own checks name the parameter and the allowed range
        make_optimizer(args.optimizer, hp)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return hp


def learning_rate_schedule(
    learning_rate: float, *, schedule: bool, epochs: int, steps_per_epoch: int
) -> optax.Schedule:
    """Constant eta, or eta x0.1 at 50% and 75% of the epochs."""
    if not schedule:
        return optax.constant_schedule(learning_rate)
    bounds: dict[int, float] = {}
    for f in DECAY_AT:  # in short runs both decays may fall on one epoch
        step = max(1, round(f * epochs)) * steps_per_epoch
        bounds[step] = bounds.get(step, 1.0) * DECAY_FACTOR
    return optax.piecewise_constant_schedule(learning_rate, bounds)


def make_optimizer(
    name: str, hp: Mapping[str, Any], learning_rate: Any = None
) -> optax.GradientTransformation:
    """The optimizer ``name`` with hyperparameters ``hp`` (lr may be a schedule).

    ``hp["weight_decay"]``, where given, is PyTorch's ``weight_decay``: L2
    added to the gradient (for δ-GClip and GClip, added after the norm is
    taken, as the library's ``weight_decay`` does)."""
    lr = hp["learning_rate"] if learning_rate is None else learning_rate
    wd = hp.get("weight_decay", 0.0)
    if name in ("sgd", "adam"):
        base = optax.sgd(lr) if name == "sgd" else optax.adam(lr)
        return optax.chain(optax.add_decayed_weights(wd), base) if wd else base
    if name == "gclip":
        return rgc.gclip(lr, hp["gamma"], weight_decay=wd)
    if name == "delta_gclip":
        return rgc.delta_gclip(lr, hp["gamma"], hp["delta"], weight_decay=wd)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def step_log(
    grads: Any, opt_state: Any, learning_rate: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(grad_norm, h)`` of the step just taken.

    For δ-GClip and GClip both come from the optimizer state (no extra pass over
    the gradient) and ``h = learning_rate * scale``; for SGD and Adam, ``h`` is
    the learning rate and the norm is computed with :func:`rgc.global_norm`.
    """
    # rgc.read_clip_state finds the rule's state by type, not by name: a
    # LayerNorm's "scale" parameter sits in Adam's moments under the same name.
    try:
        log = rgc.read_clip_state(opt_state)
    except ValueError:  # SGD or Adam: no rule in the state
        return rgc.global_norm(grads), jnp.asarray(learning_rate, jnp.float32)
    return log.grad_norm, learning_rate * log.scale


REGIMES = ("unclipped", "clipped", "floor")


def regime_fractions(grad_norm: Any, gamma: float, delta: float) -> dict[str, float]:
    """Fractions of steps whose clipping factor was 1 (``||g|| <= gamma``),
    ``gamma / ||g||``, and ``delta`` (the floor; never for ``delta = 0``),
    from a log of gradient norms (:func:`rgc.delta_gclip_regime`)."""
    regime = np.asarray(rgc.delta_gclip_regime(np.asarray(grad_norm), gamma, delta))
    n = max(regime.size, 1)
    return {name: float(np.sum(regime == i) / n) for i, name in enumerate(REGIMES)}


def steps_per_call(steps_per_epoch: int, at_most: int) -> int:
    """The largest divisor of the epoch's step count that is <= ``at_most``."""
    return max(
        d
        for d in range(1, min(at_most, steps_per_epoch) + 1)
        if steps_per_epoch % d == 0
    )


def device_description() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
    }


def steps_per_epoch(n_train: int, batch_size: int, devices: int = 1) -> int:
    """Full batches per epoch; exits with a message when the batch does not
    split over ``devices`` or exceeds the training set."""
    if batch_size % devices:
        raise SystemExit(
            f"error: --batch-size={batch_size} must be a multiple of the "
            f"{devices} local devices it is split over"
        )
    if n_train < batch_size:
        raise SystemExit(
            f"error: --batch-size={batch_size} exceeds the {n_train} training images"
        )
    return n_train // batch_size


def padded_batches(
    images: np.ndarray, labels: np.ndarray, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(images, labels, weight)`` batches of exactly ``batch`` examples for
    evaluation: the last is zero-padded, with weight 0 on the padding."""
    for i in range(0, len(images), batch):
        xb, yb = images[i : i + batch], labels[i : i + batch]
        pad = batch - len(xb)
        weight = np.r_[np.ones(len(xb)), np.zeros(pad)].astype(np.float32)
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        yield xb, yb, weight


def epoch_batches(seed: int, epoch: int, n_train: int, batch_size: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices of one epoch: a fresh permutation
    seeded by ``(seed, epoch)``, so runs are reproducible; the last partial
    batch is dropped."""
    order = np.random.default_rng((seed, epoch)).permutation(n_train)
    steps = n_train // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


class StepLog:
    """Per-step logs (``loss``, ``grad_norm``, ``h``) and training wall time,
    gathered from jitted chunks of steps; the first chunk, which compiles, is
    timed apart. The loop that calls it stays in the example."""

    KEYS = ("loss", "grad_norm", "h")

    def __init__(self) -> None:
        self.steps: dict[str, list[np.ndarray]] = {k: [] for k in self.KEYS}
        self.start = time.perf_counter()
        self.first_chunk_seconds: float | None = None
        self.train_seconds = 0.0
        self.timed_steps = 0

    def run(self, train_chunk: Callable[..., Any], *args: Any) -> tuple[Any, dict]:
        """Calls ``train_chunk(*args) -> (carry, logs)``, waits for it, records
        its logs and time, and returns ``(carry, logs)`` on the host."""
        t0 = time.perf_counter()
        carry, logs = train_chunk(*args)
        logs = jax.device_get(logs)  # also waits for the chunk
        elapsed = time.perf_counter() - t0
        n = len(logs["loss"])
        if self.first_chunk_seconds is None:
            self.first_chunk_seconds = elapsed
        else:
            self.train_seconds += elapsed
            self.timed_steps += n
        for key in self.KEYS:
            self.steps[key].append(np.asarray(logs[key], np.float64))
        return carry, logs

    def history(
        self, evaluations: list[dict[str, Any]], key: str = "epochs"
    ) -> dict[str, Any]:
        """The run's history: the evaluations under ``key`` (per-epoch metrics,
        epoch 0 first, for the epoch examples), the per-step logs, wall times
        and the training steps per second after compilation."""
        return {
            key: evaluations,
            "steps": {k: np.concatenate(v).tolist() for k, v in self.steps.items()},
            "wall_seconds": time.perf_counter() - self.start,
            "first_chunk_seconds": self.first_chunk_seconds,
            "train_steps_per_second": self.timed_steps / self.train_seconds
            if self.timed_steps and self.train_seconds > 0
            else None,
        }


def run_record(
    experiment: str,
    args: Any,
    hp: Mapping[str, float],
    data: Mapping[str, np.ndarray],
    summary: dict[str, float],
    history: dict[str, Any],
) -> dict[str, Any]:
    """The JSON record of one run."""
    return {
        "experiment": experiment,
        "hyperparameters": {**vars(args), **hp},
        "data": {
            "dir": str(args.data_dir),
            "train": len(data["x_train"]),
            "test": len(data["x_test"]),
        },
        "device": device_description(),
        "summary": summary,
        "history": history,
    }


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN/inf: a diverged value is written as null."""
    return x if math.isfinite(x) else None


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(record)))


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float):
        return finite_or_none(x)
    if isinstance(x, Path):
        return str(x)
    return x


def save_figure(fig: Any, path: Path) -> None:
    """Lays out, writes (100 dpi, creating the folder) and closes ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_rate_per_step(n_steps: int, schedule: optax.Schedule) -> np.ndarray:
    return np.asarray(jax.vmap(schedule)(jnp.arange(n_steps)))


def plot_run(
    record: dict[str, Any],
    path: Path,
    *,
    schedule: optax.Schedule,
    metric_panels: tuple[tuple[str, ...], ...],
    log_metrics: bool,
) -> None:
    """Per-epoch curves (one panel per group of metrics) and ``h`` per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = record["history"]
    hp = record["hyperparameters"]
    epochs = [m["epoch"] for m in history["epochs"]]
    panels = len(metric_panels) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    for ax, keys in zip(axes, metric_panels, strict=False):
        for key in keys:
            values = [
                m[key] if m[key] is not None else np.nan for m in history["epochs"]
            ]
            ax.plot(epochs, values, label=key.replace("_", " "))
        if log_metrics:
            ax.set_yscale("log")
        ax.set_xlabel("epoch (0 = initialization)")
        ax.legend()
    axes[0].set_title(f"{record['experiment']}: {hp['optimizer']}, seed {hp['seed']}")
    ax = axes[-1]
    h = np.asarray(history["steps"]["h"], dtype=np.float64)
    ax.plot(h, lw=0.6, label="h (step size)")
    eta = learning_rate_per_step(len(h), schedule)
    ax.plot(eta, color="gray", ls="--", lw=1, label="η")
    if hp.get("delta") is not None and hp["optimizer"] == "delta_gclip":
        ax.plot(eta * hp["delta"], color="red", ls=":", lw=1, label="ηδ (floor)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("h")
    ax.set_title("h = η·min(1, max(δ, γ/‖g‖))")
    ax.legend()
    save_figure(fig, path)
