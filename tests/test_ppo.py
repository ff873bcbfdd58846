"""Smoke tests of the PPO example: a few updates on CartPole, its logs and its
files, GAE against a NumPy loop, and its command-line errors."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import rgclip_optax as rgc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
# gymnax comes with the rl extra (it caps jax below 0.12, so the test extra
# leaves it out); without it the example says so in one line (test_extras.py).
pytest.importorskip("gymnax", reason="gymnax is in the rl extra")
import ppo  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("optimizer", ppo.OPTIMIZERS)
def test_ppo_return_rises_and_files_are_written(tmp_path, optimizer):
    out = tmp_path / optimizer
    record = ppo.main(
        [
            "--optimizer", optimizer, "--total-timesteps", "40960",
            "--num-envs", "8", "--num-steps", "64", "--learning-rate", "1e-3",
            "--updates-per-call", "10", "--out", str(out), "--seed", "1",
        ]
    )  # fmt: skip
    updates = record["history"]["updates"]
    assert len(updates) == 80 and updates[-1]["env_steps"] == 40960
    returns = np.array([u["episode_return"] for u in updates], np.float64)
    # A random CartPole policy lasts ~20 steps; PPO doubles that within 80
    # updates with either clipping.
    assert np.nanmean(returns[:5]) < 30
    assert np.nanmean(returns[-10:]) > 2 * np.nanmean(returns[:5])
    steps = record["history"]["steps"]
    assert len(steps["grad_norm"]) == 80 * 4 * 4 == len(steps["h"])
    fr = record["summary"]["regime_fractions"]
    assert sum(fr.values()) == pytest.approx(1.0)
    if optimizer == "clip_adam":
        assert fr["floor"] == 0.0
    # h is the annealed learning rate times the clipping factor of the logged
    # norm (delta 0 for clip_by_global_norm).
    delta = 0.1 if optimizer == "delta_gclip_adam" else 0.0
    n = np.arange(len(steps["h"]))
    lr = 1e-3 * (1 - n / len(n))
    s = np.asarray(rgc.delta_gclip_scale(np.asarray(steps["grad_norm"]), 0.5, delta))
    np.testing.assert_allclose(steps["h"], lr * s, rtol=1e-5, atol=1e-10)
    evals = record["history"]["evaluations"]
    assert len(evals) == 20 and evals[-1]["env_steps"] == 40960
    assert record["summary"]["final_return"] == evals[-1]["episode_return"]
    # Each evaluation is the mean over the episodes ended in its 4 updates.
    ends = [u for u in updates[-4:] if u["episode_return"] is not None]
    assert min(u["episode_return"] for u in ends) <= evals[-1]["episode_return"]
    assert evals[-1]["episode_return"] <= max(u["episode_return"] for u in ends)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"] == record["summary"]
    assert (out / "curves.png").read_bytes()[:8] == PNG


def test_seeds_train_together_in_one_vmapped_program(tmp_path):
    # --num-seeds 2: one jit(vmap(...)) program over seeds 3 and 4. Each seed
    # starts as its own single-seed run does: its first minibatch steps have
    # the same losses and gradient norms (the vmapped program may round
    # differently, and sampled actions then drift apart).
    small = [
        "--total-timesteps", "2048", "--num-envs", "4", "--num-steps", "32",
        "--updates-per-call", "4", "--no-plot",
    ]  # fmt: skip
    out = tmp_path / "two"
    record = ppo.main([*small, "--seed", "3", "--num-seeds", "2", "--out", str(out)])
    assert [r["seed"] for r in record["seeds"]] == [3, 4]
    finals = [r["summary"]["final_return"] for r in record["seeds"]]
    assert record["summary"]["final_returns"] == finals
    assert record["summary"]["final_return"] == pytest.approx(np.mean(finals))
    assert record["summary"]["final_return_std"] == pytest.approx(np.std(finals))
    assert sum(record["summary"]["regime_fractions"].values()) == pytest.approx(1.0)
    assert record["history"]["env_steps_per_second"] > 0
    first = [r["history"]["steps"] for r in record["seeds"]]
    assert first[0]["grad_norm"][:4] != first[1]["grad_norm"][:4]
    for seed, steps in zip((3, 4), first, strict=True):
        alone = ppo.main([*small, "--seed", str(seed), "--out", str(tmp_path / "1")])
        assert len(steps["grad_norm"]) == len(alone["history"]["steps"]["grad_norm"])
        for k in ("loss", "grad_norm"):
            np.testing.assert_allclose(
                steps[k][:4], alone["history"]["steps"][k][:4], rtol=1e-4
            )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"]["final_returns"] == finals


def test_gae_matches_a_numpy_loop():
    rng = np.random.default_rng(0)
    T, E, gamma, lam = 7, 3, 0.9, 0.8
    reward, value = rng.normal(size=(T, E)), rng.normal(size=(T, E))
    end = (rng.random((T, E)) < 0.3).astype(np.float32)
    last = rng.normal(size=E)
    batch = ppo.Transition(
        obs=jnp.zeros((T, E, 1)), action=jnp.zeros((T, E), int),
        log_prob=jnp.zeros((T, E)), value=jnp.asarray(value, jnp.float32),
        reward=jnp.asarray(reward, jnp.float32), terminated=jnp.asarray(end),
        episode_end=jnp.asarray(end),
    )  # fmt: skip
    adv, targets = ppo.advantages_and_targets(batch, jnp.asarray(last), gamma, lam)
    expect = np.zeros((T, E))
    gae, next_value = np.zeros(E), last
    for t in reversed(range(T)):
        d = reward[t] + gamma * next_value * (1 - end[t]) - value[t]
        gae = d + gamma * lam * (1 - end[t]) * gae
        expect[t], next_value = gae, value[t]
    np.testing.assert_allclose(adv, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, expect + value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--delta", "2"], "delta"),
        (["--max-grad-norm", "0"], "gamma"),
        (["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
        (["--num-envs", "0"], "--num-envs must be a positive integer, got 0"),
        (["--num-minibatches", "3"], "--num-minibatches=3 must divide"),
        (["--total-timesteps", "10"], "--total-timesteps=10 is less than one"),
        (["--env", "Pong"], "invalid choice: 'Pong'"),
        (["--num-seeds", "0"], "--num-seeds must be a positive integer, got 0"),
    ],
)
def test_bad_command_lines_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        ppo.parse_args(argv)
    assert message in capsys.readouterr().err


def test_runner_tables_ppo_with_regime_fractions(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_experiments

    md = paper_experiments.main(
        [
            "ppo_cartpole", "--seeds", "0", "--jobs", "2",
            "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"),
            "--total-timesteps", "8192", "--num-envs", "8", "--num-steps", "64",
            "--no-plot",
        ]
    )  # fmt: skip
    assert md.name == "ppo_cartpole.md"
    table = md.read_text()
    assert "gymnax `CartPole-v1`" in table and "8,192 environment steps" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert "steps unclipped / clipped / at floor" in rows[0]
    for label, opt in (
        ("clip + Adam", "clip_adam"),
        ("δ-GClip + Adam", "delta_gclip_adam"),
    ):
        row = next(r for r in rows if r.startswith(f"| {label} |"))
        run = json.loads(
            (tmp_path / "runs" / f"{opt}_seed0" / "metrics.json").read_text()
        )
        assert f"{run['summary']['final_return']:.4f}" in row
        fr = run["summary"]["regime_fractions"]
        assert f"{fr['unclipped']:.2f} / {fr['clipped']:.2f} / {fr['floor']:.2f}" in row
    assert "δ=0.1" in next(r for r in rows if r.startswith("| δ-GClip + Adam"))
    assert md.with_suffix(".png").read_bytes()[:8] == PNG
