"""PPO on gymnax's classic-control environments, in pure JAX with Flax NNX.

The whole training loop is jitted: rollouts step ``--num-envs`` copies of the
environment under ``jax.vmap`` inside ``jax.lax.scan``, and every PPO update
(``--update-epochs`` passes over ``--num-minibatches`` shuffled minibatches)
runs in the same compiled program. The optimizers compared:

* ``clip_adam``: PPO's standard ``chain(clip_by_global_norm(0.5), adam(lr))``;
* ``delta_gclip_adam``: ``chain(rgc.scale_by_delta_gclip(0.5, delta),
  adam(lr))``, the same with the δ floor on the clipping factor.

Both log, per minibatch step, the gradient norm and the clipping factor ``s``
(``h = lr * s`` is the step size handed to Adam), so the regime fractions (how
often the gradient was unclipped, clipped, or held at the floor) come with the
returns. Episodes that end by the time limit are bootstrapped from the value of
their final observation; episodes that terminate are not.

Writes ``metrics.json`` (episode return per update, per-step ``loss``,
``grad_norm`` and ``h``, regime fractions, hyperparameters, device) and
``curves.png`` under ``--out``.

With ``--num-seeds N`` the seeds ``--seed`` to ``--seed + N - 1`` train
together in one compiled program, ``jax.jit(jax.vmap(...))`` over the seeds,
as JAX's RL code trains its sweeps; ``metrics.json`` then holds each seed's
results under ``seeds`` and their mean and spread under ``summary``.

Run (each well under a minute on 2 CPU cores, the 4 seeds too):

    python examples/ppo.py --env CartPole-v1 --optimizer delta_gclip_adam --seed 0
    python examples/ppo.py --optimizer delta_gclip_adam --num-seeds 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, NamedTuple

from extras import require

require("gymnax", "flax", "tqdm", "matplotlib")

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm
from training_common import (
    check_positive_ints,
    device_description,
    regime_fractions,
    save_figure,
    steps_per_call,
    write_json,
)

import rgclip_optax as rgc

EXPERIMENT = "ppo"
OPTIMIZERS = ("clip_adam", "delta_gclip_adam")
ENVS = ("CartPole-v1", "Acrobot-v1")


# ---------------------------------------------------------------- the model


class ActorCritic(nnx.Module):
    """Separate two-layer tanh MLPs for the policy logits and the value, with
    orthogonal initialization (gain sqrt(2); 0.01 on the policy head, 1 on the
    value head), as in the PPO implementation details of Huang et al."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: int, rngs: nnx.Rngs):
        def dense(n_in: int, n_out: int, gain: float) -> nnx.Linear:
            return nnx.Linear(
                n_in,
                n_out,
                kernel_init=nnx.initializers.orthogonal(gain),
                bias_init=nnx.initializers.zeros_init(),
                rngs=rngs,
            )

        g = float(np.sqrt(2.0))
        self.actor = nnx.Sequential(
            dense(obs_dim, hidden, g),
            jnp.tanh,
            dense(hidden, hidden, g),
            jnp.tanh,
            dense(hidden, num_actions, 0.01),
        )
        self.critic = nnx.Sequential(
            dense(obs_dim, hidden, g),
            jnp.tanh,
            dense(hidden, hidden, g),
            jnp.tanh,
            dense(hidden, 1, 1.0),
        )

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.actor(obs), self.critic(obs)[..., 0]


def make_optimizer(args: argparse.Namespace, num_updates: int) -> Any:
    """(optimizer, learning-rate schedule): the clipping transform, then Adam
    with a learning rate annealed linearly to 0 over the minibatch steps."""
    steps = num_updates * args.update_epochs * args.num_minibatches
    schedule = optax.linear_schedule(args.learning_rate, 0.0, steps)
    if args.optimizer == "clip_adam":
        clip = optax.clip_by_global_norm(args.max_grad_norm)
    else:
        clip = rgc.scale_by_delta_gclip(args.max_grad_norm, args.delta)
    return optax.chain(clip, optax.adam(schedule, eps=1e-5)), schedule


# ----------------------------------------------------------------- the loss


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array  # time-limit endings bootstrapped into it
    terminated: jax.Array
    episode_end: jax.Array  # terminated or truncated: cuts the GAE chain


def advantages_and_targets(
    batch: Transition, last_value: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation, scanned backwards over time."""

    def back(carry: tuple[jax.Array, jax.Array], t: Transition) -> Any:
        gae, next_value = carry
        not_end = 1.0 - t.episode_end
        delta = t.reward + gamma * next_value * not_end - t.value
        gae = delta + gamma * lam * not_end * gae
        return (gae, t.value), gae

    _, adv = jax.lax.scan(
        back, (jnp.zeros_like(last_value), last_value), batch, reverse=True
    )
    return adv, adv + batch.value


def ppo_loss(
    model: ActorCritic,
    batch: Transition,
    adv: jax.Array,
    targets: jax.Array,
    args: argparse.Namespace,
) -> jax.Array:
    """Clipped surrogate + 0.5-weighted clipped value loss - entropy bonus."""
    logits, value = model(batch.obs)
    log_probs = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_probs, batch.action[:, None], -1)[:, 0]
    ratio = jnp.exp(log_prob - batch.log_prob)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    surrogate = jnp.minimum(
        ratio * adv, jnp.clip(ratio, 1 - args.clip_eps, 1 + args.clip_eps) * adv
    )
    v_clipped = batch.value + jnp.clip(
        value - batch.value, -args.clip_eps, args.clip_eps
    )
    value_loss = (
        0.5 * jnp.maximum((value - targets) ** 2, (v_clipped - targets) ** 2).mean()
    )
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, -1).mean()
    return -surrogate.mean() + args.vf_coef * value_loss - args.ent_coef * entropy


# ------------------------------------------------------------ the train step


def make_train_step(
    args: argparse.Namespace, graphdef: Any, env: Any, env_params: Any
) -> Any:
    """One PPO update: a rollout of ``num_steps`` x ``num_envs`` transitions,
    then ``update_epochs`` x ``num_minibatches`` optimizer steps."""
    num_updates = args.total_timesteps // (args.num_steps * args.num_envs)
    tx, schedule = make_optimizer(args, num_updates)
    step_env = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    gamma_clip = args.max_grad_norm
    delta = args.delta if args.optimizer == "delta_gclip_adam" else 0.0

    def train_step(carry: Any, _: Any) -> tuple[Any, dict[str, jax.Array]]:
        params, opt_state, env_state, obs, ep_return, key, step = carry

        def policy(p: Any, o: jax.Array) -> tuple[jax.Array, jax.Array]:
            return nnx.merge(graphdef, p)(o)

        def env_step(c: Any, _: Any) -> tuple[Any, tuple[Transition, jax.Array]]:
            env_state, obs, ep_return, key = c
            key, k_act, k_env = jax.random.split(key, 3)
            logits, value = policy(params, obs)
            action = jax.random.categorical(k_act, logits)
            log_prob = jnp.take_along_axis(
                jax.nn.log_softmax(logits), action[:, None], -1
            )[:, 0]
            keys = jax.random.split(k_env, args.num_envs)
            next_obs, env_state, reward, terminated, truncated, info = step_env(
                keys, env_state, action, env_params
            )
            # Time-limit endings: bootstrap from the final observation's value.
            _, final_value = policy(params, info["final_observation"])
            cut = jnp.logical_and(truncated, jnp.logical_not(terminated))
            boot = reward + args.discount * final_value * cut
            end = jnp.logical_or(terminated, truncated)
            ep_return = ep_return + reward
            finished = jnp.where(end, ep_return, jnp.nan)
            ep_return = jnp.where(end, 0.0, ep_return)
            t = Transition(
                obs,
                action,
                log_prob,
                value,
                boot,
                terminated.astype(jnp.float32),
                end.astype(jnp.float32),
            )
            return (env_state, next_obs, ep_return, key), (t, finished)

        (env_state, obs, ep_return, key), (batch, finished) = jax.lax.scan(
            env_step, (env_state, obs, ep_return, key), None, args.num_steps
        )
        _, last_value = policy(params, obs)
        adv, targets = advantages_and_targets(
            batch, last_value, args.discount, args.gae_lambda
        )

        def flat(x: jax.Array) -> jax.Array:
            return x.reshape((-1, *x.shape[2:]))

        data = jax.tree.map(flat, (batch, adv, targets))
        n = args.num_steps * args.num_envs
        mb = n // args.num_minibatches

        def minibatch_step(c: Any, idx: jax.Array) -> tuple[Any, dict]:
            p, o_state, opt_step = c
            b, a, tg = jax.tree.map(lambda x: x[idx], data)
            loss, grads = jax.value_and_grad(
                lambda p_: ppo_loss(nnx.merge(graphdef, p_), b, a, tg, args)
            )(p)
            grad_norm = rgc.global_norm(grads)
            scale = rgc.delta_gclip_scale(grad_norm, gamma_clip, delta)
            updates, o_state = tx.update(grads, o_state, p)
            p = optax.apply_updates(p, updates)
            logs = {
                "loss": loss,
                "grad_norm": grad_norm,
                "h": schedule(opt_step) * scale,
            }
            return (p, o_state, opt_step + 1), logs

        def epoch(c: Any, k: jax.Array) -> tuple[Any, dict]:
            order = jax.random.permutation(k, n)[: mb * args.num_minibatches]
            return jax.lax.scan(
                minibatch_step, c, order.reshape(args.num_minibatches, mb)
            )

        key, k_perm = jax.random.split(key)
        (params, opt_state, step), logs = jax.lax.scan(
            epoch,
            (params, opt_state, step),
            jax.random.split(k_perm, args.update_epochs),
        )
        done = jnp.isfinite(finished)
        logs = jax.tree.map(lambda x: x.reshape(-1), logs)
        logs["return_sum"] = jnp.sum(jnp.where(done, finished, 0.0))
        logs["episodes"] = jnp.sum(done)
        carry = (params, opt_state, env_state, obs, ep_return, key, step)
        return carry, logs

    return train_step, tx, num_updates


# ------------------------------------------------------- train and evaluate


def initial_carry(
    args: argparse.Namespace, env: Any, env_params: Any, seed: int
) -> tuple[Any, tuple[Any, ...]]:
    """``(graphdef, (params, env_state, obs, key))`` for one seed."""
    obs_dim = env.observation_space(env_params).shape[0]
    key = jax.random.PRNGKey(seed)
    key, k_model, k_reset = jax.random.split(key, 3)
    model = ActorCritic(obs_dim, env.num_actions, args.hidden, nnx.Rngs(k_model))
    graphdef, params = nnx.split(model)
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
        jax.random.split(k_reset, args.num_envs), env_params
    )
    return graphdef, (params, env_state, obs, key)


def seed_results(
    args: argparse.Namespace, cat: dict[str, np.ndarray], num_updates: int
) -> dict[str, Any]:
    """One seed's summary and history from its concatenated logs."""
    returns = np.where(
        cat["episodes"] > 0, cat["return_sum"] / np.maximum(cat["episodes"], 1), np.nan
    )
    delta = args.delta if args.optimizer == "delta_gclip_adam" else 0.0
    steps_per_update = args.num_steps * args.num_envs
    # Evaluations: the mean return of the episodes that ended in each
    # twentieth of training (updates without an ended episode add nothing).
    evaluations = [
        {
            "env_steps": int(part[-1] + 1) * steps_per_update,
            "episode_return": float(
                cat["return_sum"][part].sum() / cat["episodes"][part].sum()
            )
            if cat["episodes"][part].sum() > 0
            else None,
        }
        for part in np.array_split(np.arange(num_updates), min(20, num_updates))
    ]
    return {
        "summary": {
            "final_return": evaluations[-1]["episode_return"],
            "regime_fractions": regime_fractions(
                cat["grad_norm"], args.max_grad_norm, delta
            ),
        },
        "history": {
            "evaluations": evaluations,
            "updates": [
                {
                    "update": i + 1,
                    "env_steps": (i + 1) * steps_per_update,
                    "episode_return": float(r) if np.isfinite(r) else None,
                }
                for i, r in enumerate(returns)
            ],
            "steps": {
                k: cat[k].astype(np.float64).tolist()
                for k in ("loss", "grad_norm", "h")
            },
        },
    }


def train_and_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Trains ``--num-seeds`` seeds (``--seed``, ``--seed`` + 1, ...). With
    more than one, all of them run in one compiled program: the training
    chunk is ``jax.jit(jax.vmap(...))`` over the seeds' stacked states."""
    env, env_params = gymnax.make(args.env)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    # Each seed's model is initialized here, outside the vmap: under
    # jit(vmap(...)) over 2 or more seeds, XLA:CPU (jaxlib 0.10.2) sometimes
    # deadlocked in the batched QR behind the orthogonal initializer.
    starts = [initial_carry(args, env, env_params, seed) for seed in seeds]
    graphdef = starts[0][0]
    train_step, tx, num_updates = make_train_step(args, graphdef, env, env_params)
    step0 = jnp.zeros([], jnp.int32)
    ep_return = jnp.zeros(args.num_envs)
    carries = [
        (params, tx.init(params), env_state, obs, ep_return, key, step0)
        for _, (params, env_state, obs, key) in starts
    ]
    chunk = steps_per_call(num_updates, args.updates_per_call)  # one compile
    vmapped = len(seeds) > 1

    def run_chunk(carry: Any) -> Any:
        return jax.lax.scan(train_step, carry, None, chunk)

    if vmapped:
        carry = jax.tree.map(lambda *xs: jnp.stack(xs), *carries)
        train_chunk = jax.jit(jax.vmap(run_chunk))
    else:
        carry = carries[0]
        train_chunk = jax.jit(run_chunk)

    logs: list[dict[str, np.ndarray]] = []
    start = time.perf_counter()
    compile_seconds = 0.0
    label = f"{args.env} {args.optimizer}" + (
        f" x{len(seeds)} seeds" if vmapped else ""
    )
    with tqdm(total=num_updates, desc=label, unit="upd") as bar:
        for first in range(0, num_updates, chunk):
            t0 = time.perf_counter()
            carry, out = train_chunk(carry)
            out = jax.device_get(out)
            if first == 0:
                compile_seconds = time.perf_counter() - t0
            logs.append(out)
            bar.update(chunk)
            recent = out["return_sum"].sum() / max(out["episodes"].sum(), 1)
            bar.set_postfix(ret=f"{recent:.1f}")
    wall = time.perf_counter() - start
    axis = 1 if vmapped else 0  # the seed axis comes first
    cat = {k: np.concatenate([o[k] for o in logs], axis) for k in logs[0]}
    if not vmapped:
        cat = {k: v[None] for k, v in cat.items()}
    per_seed = []
    for i in range(len(seeds)):
        # (updates, minibatch steps) -> steps
        one = {k: v[i].reshape(-1) if v[i].ndim > 1 else v[i] for k, v in cat.items()}
        per_seed.append(seed_results(args, one, num_updates))
    steps_per_update = args.num_steps * args.num_envs
    minibatch_steps = args.update_epochs * args.num_minibatches
    timed = (num_updates - chunk) * len(seeds)  # the first chunk compiles
    train_seconds = max(wall - compile_seconds, 1e-9)
    timing = {
        "wall_seconds": wall,
        "first_chunk_seconds": compile_seconds,
        # all seeds together
        "env_steps_per_second": timed * steps_per_update / train_seconds
        if timed
        else None,
        # optimizer (minibatch) steps per second, as the other examples log
        "train_steps_per_second": timed * minibatch_steps / train_seconds
        if timed
        else None,
    }
    record: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "hyperparameters": {**vars(args), "num_updates": num_updates},
        "device": device_description(),
        "setup": [
            f"**Environment:** gymnax `{args.env}`",
            f"**Training:** {args.total_timesteps:,} environment steps, "
            f"{args.num_envs} environments x {args.num_steps} steps per update, "
            f"{args.update_epochs} epochs of {args.num_minibatches} minibatches, "
            "learning rate annealed linearly to 0; *return* is the mean over the "
            "episodes that ended in each twentieth of training, *final* the last "
            "twentieth",
        ],
    }
    if not vmapped:
        only = per_seed[0]
        return record | {
            "summary": only["summary"],
            "history": only["history"] | timing,
        }
    finals = [r["summary"]["final_return"] for r in per_seed]
    known = [f for f in finals if f is not None]
    record["setup"].append(
        f"**Seeds:** {seeds[0]} to {seeds[-1]}, trained together in one "
        "program (`jax.jit(jax.vmap(...))` over the seeds)"
    )
    return record | {
        "summary": {
            "final_return": float(np.mean(known)) if known else None,
            "final_return_std": float(np.std(known)) if known else None,
            "final_returns": finals,
            "regime_fractions": regime_fractions(
                np.concatenate(
                    [np.asarray(r["history"]["steps"]["grad_norm"]) for r in per_seed]
                ),
                args.max_grad_norm,
                args.delta if args.optimizer == "delta_gclip_adam" else 0.0,
            ),
        },
        "history": timing,
        "seeds": [{"seed": s} | r for s, r in zip(seeds, per_seed, strict=True)],
    }


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hp = record["hyperparameters"]
    if "seeds" in record:
        plot_seeds(record, path)
        return
    hist = record["history"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [u["env_steps"] for u in hist["updates"]]
    ret = [
        np.nan if u["episode_return"] is None else u["episode_return"]
        for u in hist["updates"]
    ]
    ax1.plot(x, ret, lw=0.5, alpha=0.5, label="per update")
    ax1.plot(
        [e["env_steps"] for e in hist["evaluations"]],
        [
            np.nan if e["episode_return"] is None else e["episode_return"]
            for e in hist["evaluations"]
        ],
        marker="o",
        label="per twentieth of training",
    )
    ax1.set_xlabel("environment steps")
    ax1.set_ylabel("mean return of the episodes that ended")
    ax1.legend()
    ax1.set_title(f"{hp['env']}: {hp['optimizer']}, seed {hp['seed']}")
    ax2.plot(hist["steps"]["grad_norm"], lw=0.5, label="‖g‖")
    ax2.axhline(hp["max_grad_norm"], color="gray", ls="--", lw=1, label="γ")
    if hp["optimizer"] == "delta_gclip_adam":
        ax2.axhline(
            hp["max_grad_norm"] / hp["delta"],
            color="red",
            ls=":",
            lw=1,
            label="γ/δ (floor above)",
        )
    ax2.set_yscale("log")
    ax2.set_xlabel("minibatch step")
    fr = record["summary"]["regime_fractions"]
    ax2.set_title(
        f"unclipped {fr['unclipped']:.2f}, clipped {fr['clipped']:.2f}, "
        f"floor {fr['floor']:.2f}"
    )
    ax2.legend()
    save_figure(fig, path)


def plot_seeds(record: dict[str, Any], path: Path) -> None:
    """Each seed's return per twentieth of training, and its gradient norms."""
    import matplotlib.pyplot as plt

    hp = record["hyperparameters"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in record["seeds"]:
        evals = r["history"]["evaluations"]
        ax1.plot(
            [e["env_steps"] for e in evals],
            [np.nan if e["episode_return"] is None else e["episode_return"]
             for e in evals],
            marker=".",
            label=f"seed {r['seed']}",
        )  # fmt: skip
        ax2.plot(r["history"]["steps"]["grad_norm"], lw=0.4, alpha=0.6)
    ax1.set_xlabel("environment steps")
    ax1.set_ylabel("mean return of the episodes that ended")
    ax1.legend(fontsize="small")
    ax1.set_title(f"{hp['env']}: {hp['optimizer']}, {len(record['seeds'])} seeds")
    ax2.axhline(hp["max_grad_norm"], color="gray", ls="--", lw=1, label="γ")
    ax2.set_yscale("log")
    ax2.set_xlabel("minibatch step")
    ax2.set_ylabel("‖g‖")
    ax2.legend()
    save_figure(fig, path)


# --------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", choices=ENVS, default="CartPole-v1")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="delta_gclip_adam")
    p.add_argument("--learning-rate", type=float, default=2.5e-4)
    p.add_argument(
        "--max-grad-norm", type=float, default=0.5, help="gamma of both clippings"
    )
    p.add_argument("--delta", type=float, default=0.1, help="δ (delta_gclip_adam)")
    p.add_argument("--total-timesteps", type=int, default=500_000)
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=128, help="rollout length")
    p.add_argument("--update-epochs", type=int, default=4)
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--gae-lambda", type=float, default=0.95)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--ent-coef", type=float, default=0.01)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-seeds",
        type=int,
        default=1,
        help="train seeds --seed, --seed + 1, ... together, in one compiled "
        "program (jax.jit(jax.vmap(...)) over the seeds)",
    )
    p.add_argument("--updates-per-call", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("runs/ppo"))
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    check_positive_ints(
        p,
        args,
        ("num_envs", "num_steps", "update_epochs", "num_minibatches", "hidden",
         "updates_per_call", "total_timesteps", "num_seeds"),
    )  # fmt: skip
    if args.total_timesteps < args.num_steps * args.num_envs:
        p.error(
            f"--total-timesteps={args.total_timesteps} is less than one rollout "
            f"(--num-steps x --num-envs = {args.num_steps * args.num_envs})"
        )
    if (args.num_steps * args.num_envs) % args.num_minibatches:
        p.error(
            f"--num-minibatches={args.num_minibatches} must divide --num-steps x "
            f"--num-envs = {args.num_steps * args.num_envs}"
        )
    try:  # the library's checks name the parameter and the allowed range
        rgc.scale_by_delta_gclip(args.max_grad_norm, args.delta)
        optax.adam(args.learning_rate)
        if not args.learning_rate > 0:
            raise ValueError(f"--learning-rate must be > 0, got {args.learning_rate}")
    except (ValueError, TypeError) as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    record = train_and_evaluate(args)
    write_json(args.out / "metrics.json", record)
    if not args.no_plot:
        plot(record, args.out / "curves.png")
    s = record["summary"]
    fr = s["regime_fractions"]
    seeds = f"seed {args.seed}"
    final = f"{s['final_return']:.1f}"
    if args.num_seeds > 1:
        seeds = f"seeds {args.seed}-{args.seed + args.num_seeds - 1}"
        final = f"{final} +- {s['final_return_std']:.1f} (mean +- std)"
    rate = record["history"]["env_steps_per_second"]
    speed = f", {rate:,.0f} env steps/s" if rate else ""
    print(
        f"{args.env} {args.optimizer} {seeds}: final return {final}; steps "
        f"unclipped {fr['unclipped']:.2f}, clipped {fr['clipped']:.2f}, at the "
        f"floor {fr['floor']:.2f}{speed}; wrote {args.out}"
    )
    return record


if __name__ == "__main__":
    main()
