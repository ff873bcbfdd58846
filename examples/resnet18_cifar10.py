"""ResNet-18 on CIFAR-10 with Flax Linen: the paper's ResNet experiment.

The authors' setting (Tucat, Mukherjee et al., arXiv:2404.08624):

* the CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2] of
  widths 64, 128, 256, 512, BatchNorm, 4x4 average pool, a linear layer;
  PyTorch's default initialization;
* data: random crop 32 with zero padding 4, horizontal flip, per-channel
  normalization (done on the device, inside the jitted step);
* batch 512, 200 epochs, cross-entropy, no momentum, no weight decay;
* SGD eta=1; δ-GClip eta=5, gamma=0.25, delta=1e-3 (or 1e-8); GClip eta=5,
  gamma=0.25; Adam eta=1e-4;
* schedule: eta x0.1 at epochs 100 and 150 (``--no-schedule`` turns it off).

After each epoch (and at initialization, epoch 0) the network is evaluated in
inference mode on the full test set and on a fixed subset of up to 10,000
training images (no augmentation). The last partial batch of each epoch is
dropped, so every step has the same shape.

On several devices the batch is split over all local devices through ``jit``
shardings (data parallel; BatchNorm statistics are over the global batch).
``--bf16`` computes in bfloat16 with float32 parameters and optimizer state.

Full run on a GPU or TPU host (200 epochs of 97 steps):

    python examples/resnet18_cifar10.py --optimizer delta_gclip \\
        --data-dir /path/to/cifar-10-batches-py --bf16

Smoke run on a CPU:

    python examples/resnet18_cifar10.py --data-dir DIR --epochs 1 \\
        --train-subset 1024 --batch-size 128
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extras import require

require("flax", "tqdm", "matplotlib")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from data_loaders import DatasetError, load_cifar10
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm
from training_common import (
    TORCH_KERNEL_INIT,
    StepLog,
    add_common_args,
    epoch_batches,
    learning_rate_schedule,
    make_optimizer,
    padded_batches,
    plot_run,
    resolve_hyperparameters,
    run_record,
    step_log,
    steps_per_call,
    steps_per_epoch,
    torch_bias_init,
    write_json,
)

EXPERIMENT = "resnet18_cifar10"
DEFAULTS = {
    "sgd": {"learning_rate": 1.0},
    "adam": {"learning_rate": 1e-4},
    "gclip": {"learning_rate": 5.0, "gamma": 0.25},
    "delta_gclip": {"learning_rate": 5.0, "gamma": 0.25, "delta": 1e-3},
}
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
TRAIN_EVAL_SIZE = 10_000
EVAL_BATCH = 500


class BasicBlock(nn.Module):
    features: int
    strides: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=TORCH_KERNEL_INIT
        )
        # PyTorch's BatchNorm2d: momentum 0.1 (Flax counts the other way), eps 1e-5.
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
        )
        s = (self.strides, self.strides)
        y = nn.relu(norm()(conv(self.features, (3, 3), s, padding=1)(x)))
        y = norm()(conv(self.features, (3, 3), padding=1)(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm()(conv(self.features, (1, 1), s)(x))
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """The CIFAR variant of ResNet-18 (He et al. 2016; no max-pool, 3x3 stem)."""

    num_classes: int = 10
    stages: Sequence[int] = (2, 2, 2, 2)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(
            64,
            (3, 3),
            padding=1,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=TORCH_KERNEL_INIT,
        )(x)
        x = nn.relu(
            nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
            )(x)
        )
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(64 * 2**i, strides, self.dtype)(x, train)
        if self.dtype == jnp.bfloat16 and xla_cpu_fuses_reductions_with_ynnpack():
            # XLA:CPU in jaxlib 0.11-0.12 hands this pool, with the bfloat16
            # convolutions, batch norms and residual adds feeding it, to one
            # YNNPACK fusion, which returns NaN at inference (its default
            # fusion types include "reduce"; XLA_FLAGS=
            # --xla_cpu_experimental_ynn_fusion_type=-reduce avoids it too).
            # The barrier keeps the pool out of that fusion, at the cost of
            # one 4x4x512 feature map per image; GPUs and TPUs never see it.
            x = jax.lax.optimization_barrier(x)
        x = jnp.mean(x, axis=(1, 2))  # the 4x4 average pool
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=TORCH_KERNEL_INIT,
            bias_init=torch_bias_init(x.shape[-1]),
        )(x)
        return x.astype(jnp.float32)


def xla_cpu_fuses_reductions_with_ynnpack() -> bool:
    """Whether this program runs on XLA:CPU from jaxlib 0.11 on, whose default
    YNNPACK fusions take reductions (and their producers) in."""
    import jaxlib

    version = tuple(int(v) for v in jaxlib.__version__.split(".")[:2])
    return jax.default_backend() == "cpu" and version >= (0, 11)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32, per-channel standardized."""
    return (images.astype(jnp.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """Random 32x32 crop of the zero-padded (4) image and a random h-flip."""
    n = images.shape[0]
    k_row, k_col, k_flip = jax.random.split(key, 3)
    padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    rows = jax.random.randint(k_row, (n,), 0, 9)
    cols = jax.random.randint(k_col, (n,), 0, 9)
    crops = jax.vmap(
        lambda im, r, c: jax.lax.dynamic_slice(im, (r, c, 0), (32, 32, 3))
    )(padded, rows, cols)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_args(
        parser,
        defaults=DEFAULTS,
        epochs=200,
        batch_size=512,
        data_dir=None,
        out=Path("runs/resnet18_cifar10"),
        schedule=True,
    )
    parser.add_argument(
        "--train-subset",
        type=int,
        help="train on the first N training images only (smoke runs)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 compute, float32 parameters"
    )
    args = parser.parse_args(argv)
    if args.train_subset is not None and args.train_subset < 1:
        parser.error(
            f"--train-subset must be a positive integer, got {args.train_subset}"
        )
    return args, resolve_hyperparameters(parser, args, DEFAULTS)


def train_and_evaluate(
    args: argparse.Namespace, hp: dict[str, float], data: dict[str, np.ndarray]
) -> tuple[dict[str, Any], optax.Schedule]:
    """Trains ``args.epochs`` epochs, evaluating after each (epoch 0 is the
    initialization); returns the run's record and the learning-rate schedule."""
    n_train = len(data["x_train"])
    n_dev = jax.local_device_count()
    steps = steps_per_epoch(n_train, args.batch_size, n_dev)
    chunk = steps_per_call(steps, args.steps_per_call)
    schedule = learning_rate_schedule(
        hp["learning_rate"],
        schedule=args.schedule,
        epochs=args.epochs,
        steps_per_epoch=steps,
    )
    tx = make_optimizer(args.optimizer, hp, schedule)

    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    batch_sharded = NamedSharding(mesh, P("data"))
    model = ResNet18(dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
    root = jax.random.key(args.seed)
    variables = jax.jit(
        lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False),
        out_shardings=replicated,
    )(jax.random.fold_in(root, 0))
    params, batch_stats = variables["params"], variables["batch_stats"]
    aug_key = jax.random.fold_in(root, 1)
    x_train = jax.device_put(data["x_train"], replicated)
    y_train = jax.device_put(data["y_train"], replicated)

    def train_step(
        carry: tuple[Any, Any, Any, jax.Array], batch_index: jax.Array
    ) -> tuple[tuple[Any, Any, Any, jax.Array], dict[str, jax.Array]]:
        p, stats, opt_state, step = carry
        batch_index = jax.lax.with_sharding_constraint(batch_index, batch_sharded)
        x = normalize(augment(jax.random.fold_in(aug_key, step), x_train[batch_index]))
        y = y_train[batch_index]

        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            logits, new = model.apply(
                {"params": p, "batch_stats": stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, new["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        grad_norm, h = step_log(grads, opt_state, schedule(step))
        p = optax.apply_updates(p, updates)
        logs = {"loss": loss, "grad_norm": grad_norm, "h": h}
        return (p, stats, opt_state, step + 1), logs

    # One jitted call per step, not a lax.scan over steps: on XLA:CPU the
    # convolutions of a scanned step ran 35x slower (jax 0.10.2), and on a GPU
    # a ResNet-18 step is long enough that dispatch costs nothing.
    train_step_jit = jax.jit(train_step, donate_argnums=0)

    def train_chunk(carry: Any, batch_indices: np.ndarray) -> Any:
        logs = []
        for batch_index in batch_indices:
            carry, log = train_step_jit(carry, batch_index)
            logs.append(log)
        return carry, jax.tree.map(lambda *x: jnp.stack(x), *logs)

    @jax.jit
    def eval_batch(
        p: Any, stats: Any, images: jax.Array, labels: jax.Array, weight: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        images = jax.lax.with_sharding_constraint(images, batch_sharded)
        logits: jax.Array = model.apply(  # type: ignore[assignment]
            {"params": p, "batch_stats": stats}, normalize(images), train=False
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, -1) == labels
        return jnp.sum(weight * loss), jnp.sum(weight * correct)

    def evaluate_split(
        p: Any, stats: Any, images: np.ndarray, labels: np.ndarray
    ) -> tuple[float, float]:
        batch = EVAL_BATCH - EVAL_BATCH % n_dev
        loss_sum, correct = 0.0, 0.0
        for xb, yb, weight in padded_batches(images, labels, batch):
            ls, c = eval_batch(p, stats, xb, yb, weight)
            loss_sum, correct = loss_sum + float(ls), correct + float(c)
        return loss_sum / len(images), correct / len(images)

    n_eval = min(TRAIN_EVAL_SIZE, n_train)

    def evaluate(carry: Any) -> dict[str, float]:
        p, stats = carry[0], carry[1]
        tr_loss, tr_acc = evaluate_split(
            p, stats, data["x_train"][:n_eval], data["y_train"][:n_eval]
        )
        te_loss, te_acc = evaluate_split(p, stats, data["x_test"], data["y_test"])
        return {
            "train_loss": tr_loss,
            "train_accuracy": tr_acc,
            "test_loss": te_loss,
            "test_accuracy": te_acc,
        }

    carry = (params, batch_stats, tx.init(params), jnp.zeros([], jnp.int32))
    # The loop: each epoch a fresh permutation, jitted chunks of steps, then
    # an evaluation (epoch 0 is the initialization).
    log = StepLog()
    metrics = [{"epoch": 0, **evaluate(carry)}]
    with tqdm(
        total=args.epochs * steps,
        desc=f"{args.optimizer} s{args.seed}",
        unit="step",
        mininterval=1.0,
    ) as bar:
        for epoch in range(1, args.epochs + 1):
            batches = epoch_batches(args.seed, epoch, n_train, args.batch_size)
            for first in range(0, steps, chunk):
                carry, logs = log.run(
                    train_chunk, carry, batches[first : first + chunk]
                )
                bar.update(chunk)
                bar.set_postfix(loss=f"{float(np.mean(logs['loss'])):.4g}")
            metrics.append({"epoch": epoch, **evaluate(carry)})
            bar.set_postfix(
                {k: f"{v:.4g}" for k, v in metrics[-1].items() if k != "epoch"}
            )
    history = log.history(metrics)
    accs = [m["test_accuracy"] for m in history["epochs"][1:]]
    summary = {
        "final_train_loss": history["epochs"][-1]["train_loss"],
        "final_test_loss": history["epochs"][-1]["test_loss"],
        "final_test_accuracy": history["epochs"][-1]["test_accuracy"],
        "best_test_accuracy": max(accs),
    }
    record = run_record(EXPERIMENT, args, hp, data, summary, history)
    return record, schedule


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, hp = parse_args(argv)
    try:
        data = load_cifar10(args.data_dir)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if args.train_subset is not None:
        data["x_train"] = data["x_train"][: args.train_subset]
        data["y_train"] = data["y_train"][: args.train_subset]
    record, schedule = train_and_evaluate(args, hp, data)
    write_json(args.out / "metrics.json", record)
    if not args.no_plot:
        plot_run(
            record,
            args.out / "curves.png",
            schedule=schedule,
            metric_panels=(
                ("train_loss", "test_loss"),
                ("train_accuracy", "test_accuracy"),
            ),
            log_metrics=False,
        )
    s = record["summary"]
    print(
        f"{args.optimizer} seed {args.seed}: final test accuracy "
        f"{s['final_test_accuracy']:.4f}, best {s['best_test_accuracy']:.4f}; "
        f"wrote {args.out}"
    )
    return record


if __name__ == "__main__":
    main()
