"""VAE on Fashion-MNIST with Flax NNX: the paper's VAE experiment.

The authors' setting (Tucat, Mukherjee et al., arXiv:2404.08624):

* an MLP VAE: encoder 784->50->50 with LeakyReLU(0.2), then mean and
  log-variance heads of 50; decoder 50->50->50->784 with a sigmoid output;
  PyTorch's default initialization U(-1/sqrt(fan_in), 1/sqrt(fan_in));
* loss: MSE plus KL, both *summed* over the mini-batch (which is why gamma is
  large), inputs scaled to [0, 1]; batch 100, 200 epochs;
* Adam eta=1e-3; SGD eta=1e-4; GClip eta=1e-3, gamma=200;
  δ-GClip eta=1e-3, gamma=200, delta=0.1;
* ``--schedule``: eta x0.1 at epochs 100 and 150, for every optimizer alike.

Train and test loss per sample are evaluated after each epoch's training, on
the full splits, with a fixed noise key; epoch 0 is the initialization. Writes
``metrics.json`` (per-epoch metrics, per-step loss, ``grad_norm`` and ``h``,
hyperparameters, device, wall time) and ``curves.png`` under ``--out``.

Run (about 6 minutes on 2 CPU cores for the full 200 epochs):

    python examples/vae_fashion_mnist.py --optimizer delta_gclip --seed 0
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

from extras import require

require("flax", "tqdm", "matplotlib")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from data_loaders import FASHION_MNIST_DIR, DatasetError, load_fashion_mnist
from flax import nnx
from tqdm import tqdm
from training_common import (
    TORCH_KERNEL_INIT,
    StepLog,
    add_common_args,
    epoch_batches,
    learning_rate_schedule,
    make_optimizer,
    plot_run,
    resolve_hyperparameters,
    run_record,
    step_log,
    steps_per_call,
    steps_per_epoch,
    torch_bias_init,
    write_json,
)

EXPERIMENT = "vae_fashion_mnist"
DEFAULTS = {
    "sgd": {"learning_rate": 1e-4},
    "adam": {"learning_rate": 1e-3},
    "gclip": {"learning_rate": 1e-3, "gamma": 200.0},
    "delta_gclip": {"learning_rate": 1e-3, "gamma": 200.0, "delta": 0.1},
}
DATA_DIM, HIDDEN, LATENT = 784, 50, 50


def _torch_linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear`` initialized as ``torch.nn.Linear``: U(±1/sqrt(fan_in))."""
    return nnx.Linear(
        d_in,
        d_out,
        kernel_init=TORCH_KERNEL_INIT,
        bias_init=torch_bias_init(d_in),
        rngs=rngs,
    )


class VAE(nnx.Module):
    """The authors' MLP VAE."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.enc1 = _torch_linear(DATA_DIM, HIDDEN, rngs)
        self.enc2 = _torch_linear(HIDDEN, HIDDEN, rngs)
        self.mean = _torch_linear(HIDDEN, LATENT, rngs)
        self.log_var = _torch_linear(HIDDEN, LATENT, rngs)
        self.dec1 = _torch_linear(LATENT, HIDDEN, rngs)
        self.dec2 = _torch_linear(HIDDEN, HIDDEN, rngs)
        self.dec_out = _torch_linear(HIDDEN, DATA_DIM, rngs)

    def __call__(
        self, x: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        h = nnx.leaky_relu(self.enc1(x), 0.2)
        h = nnx.leaky_relu(self.enc2(h), 0.2)
        mean, log_var = self.mean(h), self.log_var(h)
        z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
        h = nnx.leaky_relu(self.dec1(z), 0.2)
        h = nnx.leaky_relu(self.dec2(h), 0.2)
        return nnx.sigmoid(self.dec_out(h)), mean, log_var


def summed_loss(model: VAE, x: jax.Array, key: jax.Array) -> jax.Array:
    """Summed squared reconstruction error plus summed KL to N(0, I)."""
    recon, mean, log_var = model(x, key)
    mse = jnp.sum((recon - x) ** 2)
    kl = -0.5 * jnp.sum(1.0 + log_var - mean**2 - jnp.exp(log_var))
    return mse + kl


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_args(
        parser,
        defaults=DEFAULTS,
        epochs=200,
        batch_size=100,
        data_dir=FASHION_MNIST_DIR,
        out=Path("runs/vae_fashion_mnist"),
        schedule=False,
    )
    args = parser.parse_args(argv)
    return args, resolve_hyperparameters(parser, args, DEFAULTS)


def train_and_evaluate(
    args: argparse.Namespace, hp: dict[str, float], data: dict[str, np.ndarray]
) -> tuple[dict[str, Any], optax.Schedule]:
    """Trains ``args.epochs`` epochs, evaluating after each (epoch 0 is the
    initialization); returns the run's record and the learning-rate schedule."""
    n_train = len(data["x_train"])
    steps = steps_per_epoch(n_train, args.batch_size)
    chunk = steps_per_call(steps, args.steps_per_call)
    schedule = learning_rate_schedule(
        hp["learning_rate"],
        schedule=args.schedule,
        epochs=args.epochs,
        steps_per_epoch=steps,
    )
    tx = make_optimizer(args.optimizer, hp, schedule)

    model = VAE(nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    root = jax.random.key(args.seed)
    train_key, eval_key = jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)
    x_train = jnp.asarray(data["x_train"])
    x_test = jnp.asarray(data["x_test"])

    def loss_fn(p: Any, x: jax.Array, key: jax.Array) -> jax.Array:
        return summed_loss(nnx.merge(graphdef, p), x, key)

    def train_step(
        carry: tuple[Any, Any, jax.Array], batch_index: jax.Array
    ) -> tuple[tuple[Any, Any, jax.Array], dict[str, jax.Array]]:
        p, opt_state, step = carry
        x = x_train[batch_index]
        loss, grads = jax.value_and_grad(loss_fn)(
            p, x, jax.random.fold_in(train_key, step)
        )
        updates, opt_state = tx.update(grads, opt_state, p)
        grad_norm, h = step_log(grads, opt_state, schedule(step))
        p = jax.tree.map(jnp.add, p, updates)
        logs = {"loss": loss / x.shape[0], "grad_norm": grad_norm, "h": h}
        return (p, opt_state, step + 1), logs

    @functools.partial(jax.jit, donate_argnums=0)
    def train_chunk(carry: Any, batch_indices: jax.Array) -> Any:
        return jax.lax.scan(train_step, carry, batch_indices)

    @jax.jit
    def loss_per_sample(p: Any, x: jax.Array) -> jax.Array:
        return loss_fn(p, x, eval_key) / x.shape[0]

    def evaluate(carry: Any) -> dict[str, float]:
        p = carry[0]
        return {
            "train_loss": float(loss_per_sample(p, x_train)),
            "test_loss": float(loss_per_sample(p, x_test)),
        }

    carry = (params, tx.init(params), jnp.zeros([], jnp.int32))
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
    test = [m["test_loss"] for m in history["epochs"][1:]]
    summary = {
        "final_train_loss": history["epochs"][-1]["train_loss"],
        "final_test_loss": history["epochs"][-1]["test_loss"],
        "best_test_loss": float(np.nanmin(test))
        if np.isfinite(test).any()
        else float("nan"),
    }
    record = run_record(EXPERIMENT, args, hp, data, summary, history)
    return record, schedule


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, hp = parse_args(argv)
    try:
        data = load_fashion_mnist(args.data_dir)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    record, schedule = train_and_evaluate(args, hp, data)
    write_json(args.out / "metrics.json", record)
    if not args.no_plot:
        plot_run(
            record,
            args.out / "curves.png",
            schedule=schedule,
            metric_panels=(("train_loss", "test_loss"),),
            log_metrics=True,
        )
    s = record["summary"]
    print(
        f"{args.optimizer} seed {args.seed}: final train {s['final_train_loss']:.4f}"
        f", test {s['final_test_loss']:.4f} per sample; wrote {args.out}"
    )
    return record


if __name__ == "__main__":
    main()
