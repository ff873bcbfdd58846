"""Character-level transformer language model on the fortune files, Flax NNX.

A GPT-style decoder (causal self-attention, pre-LayerNorm, learned positions)
reads bytes of English text from the plain-text files of Debian's ``fortunes``
package (``apt-get install fortunes``; records separated by lines holding a
single ``%``). The split is deterministic, by file and record: a record goes
to validation when the CRC-32 of ``"<file>:<index>"`` is 0 mod 10.

The optimizers compared, all under the same warmup-then-cosine schedule:

* ``adamw_clip``: AdamW after ``clip_by_global_norm(gamma)``, the standard
  recipe and the baseline to beat;
* ``adamw_delta_gclip``: AdamW after ``rgc.scale_by_delta_gclip(gamma, delta)``;
* ``delta_gclip``: δ-GClip alone, the authors' way for transformers (their ViT
  runs: ``lr 0.1-0.2, gamma 1, delta 1e-3, weight_decay 1e-5``);
* ``sgd``: plain SGD.

Every ``--eval-every`` steps the validation bits per character (byte) are
measured on fixed windows. Writes ``metrics.json`` (evaluations; per-step
loss, ``grad_norm`` and ``h``; regime fractions; hyperparameters; device) and
``curves.png`` under ``--out``.

Run (about 10 minutes on 2 CPU cores with the defaults):

    python examples/char_lm.py --optimizer adamw_delta_gclip --seed 0
"""

from __future__ import annotations

import argparse
import functools
import zlib
from pathlib import Path
from typing import Any

from extras import require

require("flax", "tqdm", "matplotlib")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm
from training_common import (
    StepLog,
    check_positive_ints,
    device_description,
    override_hyperparameters,
    regime_fractions,
    step_log,
    steps_per_call,
    write_json,
)

import rgclip_optax as rgc

EXPERIMENT = "char_lm"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_HOWTO = (
    "install them with `apt-get install fortunes` (plain-text files land in "
    "/usr/share/games/fortunes) or pass --data-dir"
)
VOCAB = 256  # bytes
DEFAULTS: dict[str, dict[str, float]] = {
    "adamw_clip": {"learning_rate": 3e-3, "gamma": 1.0, "weight_decay": 0.01},
    "adamw_delta_gclip": {
        "learning_rate": 3e-3,
        "gamma": 1.0,
        "delta": 1e-3,
        "weight_decay": 0.01,
    },
    "delta_gclip": {
        "learning_rate": 0.2,
        "gamma": 1.0,
        "delta": 1e-3,
        "weight_decay": 1e-5,
    },
    "sgd": {"learning_rate": 0.3},
}
OPTIMIZERS = tuple(DEFAULTS)


# --------------------------------------------------------------------- data


def load_fortunes(data_dir: Path) -> dict[str, np.ndarray]:
    """Train and validation byte streams; records joined by ``\\n%\\n``."""
    files = (
        sorted(
            f
            for f in data_dir.iterdir()
            if f.is_file() and not f.suffix and not f.name.startswith(".")
        )
        if data_dir.is_dir()
        else []
    )
    split: dict[str, list[bytes]] = {"train": [], "validation": []}
    for f in files:
        text = f.read_bytes().replace(b"\r\n", b"\n")
        records = [r.strip(b"\n") for r in text.split(b"\n%\n")]
        for i, record in enumerate(r for r in records if r.strip(b"%\n ")):
            part = (
                "validation"
                if zlib.crc32(f"{f.name}:{i}".encode()) % 10 == 0
                else "train"
            )
            split[part].append(record)
    if not split["train"] or not split["validation"]:
        raise SystemExit(
            f"error: no fortune records in {data_dir} (found {len(files)} plain-text "
            f"files); {FORTUNES_HOWTO}"
        )
    return {
        k: np.frombuffer(b"\n%\n".join(v) + b"\n%\n", np.uint8)
        for k, v in split.items()
    }


# -------------------------------------------------------------------- model


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            heads, width, qkv_features=width, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class CharTransformer(nnx.Module):
    """Token and learned position embeddings, pre-LN blocks, a final LayerNorm
    and an untied output head."""

    def __init__(
        self, *, width: int, layers: int, heads: int, context: int, rngs: nnx.Rngs
    ):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(VOCAB, width, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (context, width)))
        self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        x = self.embed(tokens) + self.pos[...][:t]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------- optimizer


def make_optimizer(
    name: str, hp: dict[str, float], schedule: optax.Schedule
) -> optax.GradientTransformation:
    if name == "adamw_clip":
        return optax.chain(
            optax.clip_by_global_norm(hp["gamma"]),
            optax.adamw(schedule, weight_decay=hp["weight_decay"]),
        )
    if name == "adamw_delta_gclip":
        return optax.chain(
            rgc.scale_by_delta_gclip(hp["gamma"], hp["delta"]),
            optax.adamw(schedule, weight_decay=hp["weight_decay"]),
        )
    if name == "delta_gclip":
        return rgc.delta_gclip(
            schedule, hp["gamma"], hp["delta"], weight_decay=hp["weight_decay"]
        )
    if name == "sgd":
        return optax.sgd(schedule)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


# --------------------------------------------------------------------- loss


def loss_fn(model: CharTransformer, windows: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats over (batch, context) windows of
    context + 1 bytes."""
    logits = model(windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), windows[:, 1:]
    ).mean()


# --------------------------------------------------------- train and evaluate


def train_and_evaluate(args: argparse.Namespace, hp: dict[str, float]) -> dict:
    data = load_fortunes(args.data_dir)
    train = jnp.asarray(data["train"], jnp.int32)
    model = CharTransformer(
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        context=args.context,
        rngs=nnx.Rngs(args.seed),
    )
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, hp["learning_rate"], args.warmup, args.steps
    )
    tx = make_optimizer(args.optimizer, hp, schedule)
    # Fixed validation windows, evenly spaced through the validation stream.
    val = data["validation"]
    starts = np.linspace(0, len(val) - args.context - 2, args.eval_windows).astype(int)
    val_windows = jnp.asarray(
        np.stack([val[s : s + args.context + 1] for s in starts]), jnp.int32
    )
    key = jax.random.PRNGKey(args.seed)

    def train_step(carry: Any, step: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        p, opt_state = carry
        starts = jax.random.randint(
            jax.random.fold_in(key, step),
            (args.batch_size,),
            0,
            train.shape[0] - args.context - 1,
        )
        windows = jax.vmap(
            lambda s: jax.lax.dynamic_slice(train, (s,), (args.context + 1,))
        )(starts)
        loss, grads = jax.value_and_grad(
            lambda p_: loss_fn(nnx.merge(graphdef, p_), windows)
        )(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        grad_norm, h = step_log(grads, opt_state, schedule(step))
        p = optax.apply_updates(p, updates)
        return (p, opt_state), {"loss": loss, "grad_norm": grad_norm, "h": h}

    chunk = steps_per_call(args.eval_every, args.steps_per_call)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_chunk(carry: Any, steps: jax.Array) -> Any:
        return jax.lax.scan(train_step, carry, steps)

    @jax.jit
    def val_bpc(p: Any) -> jax.Array:
        return loss_fn(nnx.merge(graphdef, p), val_windows) / jnp.log(2.0)

    carry = (params, tx.init(params))
    evaluations: list[dict[str, Any]] = [
        {"step": 0, "val_bpc": float(val_bpc(params)), "train_bpc": None}
    ]
    log = StepLog()
    with tqdm(
        total=args.steps, desc=f"{args.optimizer} s{args.seed}", unit="step"
    ) as bar:
        for first in range(0, args.steps, chunk):
            carry, _ = log.run(train_chunk, carry, jnp.arange(first, first + chunk))
            bar.update(chunk)
            done = first + chunk
            if done % args.eval_every == 0 or done == args.steps:
                recent = np.concatenate(log.steps["loss"])[-args.eval_every :]
                evaluations.append(
                    {
                        "step": done,
                        "val_bpc": float(val_bpc(carry[0])),
                        "train_bpc": float(np.mean(recent) / np.log(2)),
                    }
                )
                bar.set_postfix(val_bpc=f"{evaluations[-1]['val_bpc']:.3f}")
    history = log.history(evaluations, key="evaluations")
    return {
        "experiment": EXPERIMENT,
        "hyperparameters": {**vars(args), **hp, "params": count_params(model)},
        "data": {
            "dir": str(args.data_dir),
            "train": len(data["train"]),
            "validation": len(data["validation"]),
        },
        "device": device_description(),
        "setup": [
            f"**Data:** the fortune files in `{args.data_dir}`: "
            f"{len(data['train']):,} training and {len(data['validation']):,} "
            "validation bytes, split by file and record",
            f"**Model:** {count_params(model):,} parameters: {args.layers} pre-LN "
            f"blocks of width {args.width}, {args.heads} heads, context "
            f"{args.context}",
            f"**Training:** {args.steps} steps of {args.batch_size} random windows, "
            f"warmup {args.warmup} then cosine to 0; validation bits per character "
            f"(byte) on {args.eval_windows} fixed windows every {args.eval_every} "
            "steps",
        ],
        "summary": {
            "final_val_bpc": evaluations[-1]["val_bpc"],
            "best_val_bpc": min(e["val_bpc"] for e in evaluations),
            # SGD has no clipping: gamma = inf, every step "unclipped".
            "regime_fractions": regime_fractions(
                history["steps"]["grad_norm"],
                hp.get("gamma", np.inf),
                hp.get("delta", 0.0),
            ),
        },
        "history": history,
    }


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hp, hist = record["hyperparameters"], record["history"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ev = hist["evaluations"]
    ax1.plot(
        [e["step"] for e in ev], [e["val_bpc"] for e in ev], "o-", label="validation"
    )
    ax1.plot(
        [e["step"] for e in ev[1:]],
        [e["train_bpc"] for e in ev[1:]],
        "--",
        label="train",
    )
    ax1.set_xlabel("step")
    ax1.set_ylabel("bits per character")
    ax1.set_title(
        f"char LM ({hp['params']:,} params): {hp['optimizer']}, seed {hp['seed']}"
    )
    ax1.legend()
    ax2.plot(hist["steps"]["h"], lw=0.6, label="h")
    if "delta" in hp["optimizer"]:
        sched = optax.warmup_cosine_decay_schedule(
            0.0, hp["learning_rate"], hp["warmup"], hp["steps"]
        )
        eta = np.asarray(jax.vmap(sched)(jnp.arange(hp["steps"])))
        ax2.plot(eta, color="gray", ls="--", lw=1, label="η")
        ax2.plot(eta * hp["delta"], color="red", ls=":", lw=1, label="ηδ (floor)")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    fr = record["summary"]["regime_fractions"]
    ax2.set_title(
        f"h = η·s; unclipped {fr['unclipped']:.2f}, clipped {fr['clipped']:.2f}, "
        f"floor {fr['floor']:.2f}"
    )
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw_delta_gclip")
    p.add_argument("--learning-rate", type=float, help="peak η of the schedule")
    p.add_argument("--gamma", type=float, help="clipping threshold")
    p.add_argument("--delta", type=float, help="δ floor")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--steps-per-call", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=FORTUNES_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/char_lm"))
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    check_positive_ints(
        p,
        args,
        ("steps", "batch_size", "context", "width", "layers", "heads",
         "eval_every", "eval_windows", "steps_per_call"),
    )  # fmt: skip
    if args.warmup < 0 or args.warmup >= args.steps:
        p.error(f"--warmup must be in [0, --steps={args.steps}), got {args.warmup}")
    if args.width % args.heads:
        p.error(f"--heads={args.heads} must divide --width={args.width}")
    if args.steps % args.eval_every:
        p.error(f"--eval-every={args.eval_every} must divide --steps={args.steps}")
    hp = override_hyperparameters(
        p, args, DEFAULTS, ("learning_rate", "gamma", "delta", "weight_decay")
    )
    if not hp["learning_rate"] > 0:
        p.error(f"--learning-rate must be > 0, got {hp['learning_rate']}")
    try:  # the library's checks name the parameter and the allowed range
        make_optimizer(args.optimizer, hp, optax.constant_schedule(hp["learning_rate"]))
    except (ValueError, TypeError) as e:
        p.error(str(e))
    return args, hp


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, hp = parse_args(argv)
    record = train_and_evaluate(args, hp)
    write_json(args.out / "metrics.json", record)
    if not args.no_plot:
        plot(record, args.out / "curves.png")
    s = record["summary"]
    fr = s["regime_fractions"]
    print(
        f"{args.optimizer} seed {args.seed}: validation {s['final_val_bpc']:.3f} "
        f"bits/char (best {s['best_val_bpc']:.3f}); steps unclipped "
        f"{fr['unclipped']:.2f}, clipped {fr['clipped']:.2f}, floor "
        f"{fr['floor']:.2f}; wrote {args.out}"
    )
    return record


if __name__ == "__main__":
    main()
