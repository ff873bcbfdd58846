"""What the step compiles to: tests that pin XLA's behaviour.

They read the compiled program (HLO text, ``memory_analysis``) or switch off
one of the XLA:CPU workarounds in ``rgclip_optax/_xla_cpu.py`` to show that it
is still needed, so a new jax/jaxlib release may move them: each names what
it guards against.

Versions covered: every test was run on jaxlib 0.8.0, 0.8.1, 0.8.2, 0.8.3,
0.9.0, 0.9.1, 0.9.2, 0.10.0, 0.10.1, 0.10.2 and 0.12.0.1. The memory claims
marked ``holds_from((0, 10, 2))`` fail on every jaxlib before 0.10.2 (XLA:CPU
reserved the temporaries they rule out) and are skipped there, saying so;
the others hold on all of them. The packing test checks whichever side of
jaxlib 0.11 it runs on.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import optax
import pytest

import rgclip_optax as rgc
from rgclip_optax import _xla_cpu
from tests.tpu import needs_tpu_python, run_benchmark

ROOT = Path(__file__).resolve().parents[1]


def holds_from(version: tuple[int, ...]) -> pytest.MarkDecorator:
    """Skips, with the reason, on a jaxlib older than the claim holds for."""
    shown = ".".join(map(str, version))
    return pytest.mark.skipif(
        _xla_cpu.JAXLIB_VERSION < version,
        reason=f"an XLA:CPU memory claim that holds from jaxlib {shown} (it "
        f"fails on 0.8.0 through 0.10.1); this is jaxlib {jaxlib.__version__}",
    )


def _temp_bytes(fn, x):
    mem = jax.jit(fn).lower(x).compile().memory_analysis()
    assert mem is not None
    return mem.temp_size_in_bytes


@holds_from((0, 10, 2))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_no_upcast_copy_of_the_gradient_is_materialized(dtype):
    # The float32 conversion is fused into the reduction (and into the rare
    # rescaling branch): no temporary buffer near the size of an f32 copy.
    g = jnp.ones((1024, 1024), dtype)
    assert _temp_bytes(rgc.global_norm, g) < g.size


@holds_from((0, 10, 2))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rescaled_sum_on_cpu_reserves_no_leaf_sized_buffer(dtype):
    # Several large leaves (as in a CNN): the rarely taken rescaled sum must
    # not reserve a temporary of a leaf's size. Summing x * 2**-96 in float32
    # did (XLA:CPU wrote the product out before reducing it: 12 MB for a
    # ResNet-18); the float64 accumulation fuses.
    tree = [jnp.ones((3, 3, 256, 256), dtype) for _ in range(4)]  # 2.4 MB each
    leaf_bytes = tree[0].size * 4
    assert _temp_bytes(lambda t: rgc.global_norm(t), tree) < leaf_bytes // 4


def test_float16_on_cpu_uses_no_more_memory_than_optax():
    # XLA:CPU has no float16 arithmetic and upcasts any float16 reduction,
    # optax's included; we must not add a second copy on top of that.
    g = jnp.ones((1024, 1024), jnp.float16)
    assert _temp_bytes(rgc.global_norm, g) <= _temp_bytes(optax.tree.norm, g) + 1024


def test_leaves_are_grouped_by_dtype_within_the_group_size(monkeypatch):
    from rgclip_optax import _xla_cpu

    monkeypatch.setattr(_xla_cpu, "PACK_GROUP_SIZE", 10)
    leaves = [jnp.ones(4), jnp.ones(4, jnp.bfloat16), jnp.ones(5), jnp.ones(3)]
    leaves += [jnp.ones(5000), jnp.ones(2, jnp.complex64), jnp.ones(0)]
    # With several devices (shardings unknown while tracing), fewer small
    # leaves than PACK_MIN_LEAVES are not packed; with one, they are.
    monkeypatch.setattr(_xla_cpu.jax, "device_count", lambda: 8)
    assert _xla_cpu.pack_plan(leaves) == (list(range(7)), [])
    monkeypatch.setattr(_xla_cpu, "PACK_MIN_LEAVES", 4)
    assert _xla_cpu.pack_plan(leaves)[1] != []
    monkeypatch.setattr(_xla_cpu.jax, "device_count", lambda: 1)
    monkeypatch.setattr(_xla_cpu, "PACK_MIN_LEAVES", 1000)
    alone, groups = _xla_cpu.pack_plan(leaves)
    sizes = [[(leaves[i].dtype, leaves[i].size) for i in g] for g in groups]
    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    assert sizes == [[(f32, 4), (f32, 5)], [(f32, 3)], [(bf16, 4)]]
    # Large, complex and empty leaves are reduced on their own.
    assert [leaves[i].size for i in alone] == [5000, 2, 0]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_small_leaves_are_packed_without_a_float32_concatenation(
    dtype, monkeypatch
):
    # XLA:CPU before jaxlib 0.11 turns a bfloat16 concatenation into a float32
    # one (twice the memory, plus a converted copy of every leaf); packing the
    # bits as unsigned integers avoids it. From 0.11 a plain concatenation
    # stays bfloat16 and the workaround is off. Checked on the compiled
    # program, with the plain concatenation as the control on either side.
    from rgclip_optax import _xla_cpu

    monkeypatch.setattr(_xla_cpu, "PACK_MIN_LEAVES", 1)
    tree = [jnp.ones((100,), dtype) for _ in range(50)]

    def float32_concatenations():
        text = jax.jit(lambda t: rgc.global_norm(t)).lower(tree).compile().as_text()
        return [
            line
            for line in text.splitlines()
            if "= f32[" in line and "concatenate(" in line
        ]

    assert float32_concatenations() == []
    packed_as_bits = "bitcast_convert_type" in str(
        jax.make_jaxpr(_xla_cpu.concatenate)(tree[:2])
    )
    assert packed_as_bits == _xla_cpu.NARROW_CONCATENATION_WIDENS
    if dtype == jnp.bfloat16:
        monkeypatch.setattr(_xla_cpu, "concatenate", jnp.concatenate)
        widened = float32_concatenations() != []
        assert widened == _xla_cpu.NARROW_CONCATENATION_WIDENS


@holds_from((0, 10, 2))
def test_bfloat16_step_materializes_no_float32_copy_of_the_gradient(monkeypatch):
    # The norm and the update both convert the gradient to float32. Unless the
    # norm reads it through an optimization barrier, XLA merges the two
    # conversions and writes out a float32 copy of the gradient (4x slower on
    # XLA:CPU). Fresh lambdas, so jit traces again after the monkeypatch.
    from rgclip_optax import _xla_cpu

    params = jnp.ones((1024, 1024), jnp.bfloat16)
    grads = jnp.full((1024, 1024), 0.5, jnp.bfloat16)
    tx = rgc.delta_gclip(0.1, 1.0, 0.01)
    state = tx.init(params)

    def temp_bytes(step):
        jitted = jax.jit(step, donate_argnums=(0, 1))
        mem = jitted.lower(params, state, grads).compile().memory_analysis()
        assert mem is not None
        return mem.temp_size_in_bytes

    def make_step():
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step

    f32_copy = grads.size * 4
    assert temp_bytes(make_step()) < f32_copy // 16
    monkeypatch.setattr(_xla_cpu, "unshared", list)
    assert temp_bytes(make_step()) >= f32_copy


@holds_from((0, 10, 2))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_momentum_step_copies_no_momentum_buffer(dtype):
    # Holding the momentum on a skipped step with a select between the old and
    # the new trace made XLA:CPU copy every momentum buffer (the parameter
    # update read the old trace after the held one was written in place).
    params = [jnp.ones((3, 3, 128, 128), dtype) for _ in range(4)]  # 0.6 MB f32
    tx = rgc.delta_gclip(0.1, 1.0, 0.01, momentum=0.9)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    mem = jitted.lower(params, tx.init(params), params).compile().memory_analysis()
    assert mem.temp_size_in_bytes < params[0].size * params[0].dtype.itemsize


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def _ops(text, op):
    return len(re.findall(r"\s" + op + r"\(", text))


@pytest.mark.parametrize("norm", ["global", "per_tensor"])
def test_portable_path_compiles_to_no_conditional_or_loop(norm):
    # What GPUs and TPUs lower: a conditional or loop there syncs the host
    # (XLA:GPU) or is charged as if its rare branch ran (TPU cost model).
    tree = [jnp.ones((300, 300)), jnp.ones(7), jnp.ones((3, 3), jnp.bfloat16)]
    tx = rgc.delta_gclip(0.1, 1.0, 0.01, momentum=0.9, norm=norm)
    with rgc.target_platform("tpu"):
        text = _hlo(lambda g, s: tx.update(g, s, g), tree, tx.init(tree))
    assert _ops(text, "conditional") == 0 and _ops(text, "while") == 0


@pytest.mark.parametrize("gamma", ["zscore", "percentile"])
def test_adaptive_threshold_and_spike_skipping_add_no_control_flow(gamma):
    # What GPUs and TPUs compile: the threshold's statistics and the spike
    # windows are array arithmetic (a sort for the percentile), no branch.
    threshold = (
        rgc.zscore_gamma(warmup=3)
        if gamma == "zscore"
        else rgc.percentile_gamma(window=16, warmup=3)
    )
    tx = rgc.skip_and_round(
        optax.chain(
            rgc.scale_by_delta_gclip(threshold, 0.01, wide_updates=True),
            optax.scale_by_learning_rate(0.1),
        ),
        spike_sigmas=6.0, spike_window=16, spike_warmup=4,
    )  # fmt: skip
    tree = [jnp.ones((300, 300)), jnp.ones(7)]
    with rgc.target_platform("tpu"):
        text = _hlo(
            lambda g, s: tx.update(g, s, g, value=jnp.float32(1.0)),
            tree, tx.init(tree),
        )  # fmt: skip
    assert _ops(text, "conditional") == 0 and _ops(text, "while") == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_path_reads_each_leaf_with_one_reduce(dtype):
    # XLA:GPU split two jnp.sum calls of one leaf into two kernels inside a
    # training loop; one variadic reduce per leaf (and per complex part)
    # cannot be split.
    tree = [jnp.ones((64, 64), dtype), jnp.ones(7, dtype), jnp.ones(3, jnp.complex64)]
    with rgc.target_platform("gpu"):
        text = jax.jit(lambda t: rgc.global_norm(t)).lower(tree).as_text("hlo")
    reduces = re.findall(r"= \((f32\[\], f32\[\])\) reduce\(", text)
    assert len(reduces) == 4, text
    # No single-output reduction: the leaves' sums are added as scalars.
    assert len(re.findall(r"= f32\[\] reduce\(", text)) == 0


def test_auto_path_lowers_one_implementation_only():
    # The default backend's path alone is traced: the CPU program has the CPU
    # path's single conditional and nothing of a platform switch.
    text = _hlo(lambda t: rgc.global_norm(t), [jnp.ones(10), jnp.ones(3)])
    assert _ops(text, "conditional") == 1


def test_per_tensor_norms_need_no_per_leaf_control_flow():
    # 500 small leaves: one conditional on the CPU path for all of them (it
    # was one per leaf, and the step took 87 s to compile).
    tree = [jnp.ones(100) for _ in range(500)]
    tx = rgc.scale_by_delta_gclip(1.0, 0.1, norm="per_tensor")
    text = _hlo(lambda g, s: tx.update(g, s), tree, tx.init(tree))
    assert _ops(text, "conditional") == 1


@holds_from((0, 10, 2))
def test_fsdp_step_on_8_cpu_devices_meets_the_compiled_program_targets(tmp_path):
    # benchmarks/compiled_programs.py on 8 simulated CPU devices: against
    # clip+sgd (with momentum: clip + sgd with momentum), no more all-gathers,
    # and temporaries and peak memory within one per-device leaf, for
    # ResNet-18 FSDP in both dtypes and GPT-2 small FSDP in float32 (the
    # benchmark's table has the replicated rows too).
    out = tmp_path / "cpu"
    runs = [
        ["--trees", "resnet18", "--layouts", "fsdp"],
        ["--trees", "transformer", "--dtypes", "float32", "--layouts", "fsdp",
         "--optimizers", "clip_sgd", "clip_sgd_momentum", "delta_gclip",
         "delta_gclip_momentum", "delta_gclip_per_tensor"],
    ]  # fmt: skip
    for extra in runs:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "compiled_programs.py"),
             "--target", "cpu", "--out", str(out), *extra],
            capture_output=True, text=True, env=env, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        import json

        record = json.loads(out.with_suffix(".json").read_text())
        rows = record["rows"]
        assert rows and all(r["device"] == "cpu x8" for r in rows)
        checks = record["checks"]
        assert checks and all(not c["failed"] for c in checks), checks
        fsdp = [r for r in rows if r["layout"] == "fsdp"]
        assert fsdp and all(r["all_gathers"] == 0 for r in fsdp)


@needs_tpu_python
def test_tpu_program_has_no_conditional_and_no_extra_traffic(tmp_path):
    # The step compiled for a TPU v5e 2x2 without a TPU (libtpu from PyPI):
    # the portable path, no conditional or loop, no more collectives than
    # clip+sgd, and at most 1.03x its bytes in XLA's cost model.
    record = run_benchmark(
        "compiled_programs.py", tmp_path / "tpu",
        "--target", "tpu", "--topologies", "v5e:2x2", "--trees", "resnet18",
        "--dtypes", "float32", "--optimizers", "sgd", "clip_sgd", "delta_gclip",
    )  # fmt: skip
    rows = {(r["layout"], r["optimizer"]): r for r in record["rows"]}
    assert len(rows) == 6
    for layout in ("replicated", "fsdp"):
        ours, peer = rows[layout, "delta_gclip"], rows[layout, "clip_sgd"]
        assert ours["conditionals"] == 0 and ours["whiles"] == 0
        assert ours["all_gathers"] <= peer["all_gathers"]
        assert ours["all_reduces"] <= peer["all_reduces"]
        assert ours["bytes_accessed"] <= 1.03 * peer["bytes_accessed"]
    # Temporaries: met replicated; under FSDP they are above the target
    # (12.7 MB against clip+sgd's 5.4 MB + one 2.4 MB leaf), an open item.
    rep = rows["replicated", "delta_gclip"]
    assert (
        rep["temp_bytes"]
        <= rows["replicated", "clip_sgd"]["temp_bytes"]
        + (rep["largest_leaf_bytes_per_device"])
    )


@needs_tpu_python
def test_unstacked_decoder_on_a_tpu_pod_compiles_to_clip_sgds_collectives(tmp_path):
    # benchmarks/compiled_programs.py --pod --quick: a Llama-style decoder
    # with one leaf per layer weight, sharded over a 4x4 ("fsdp", "tensor")
    # mesh of a TPU v5e 4x4, in Auto and Explicit mode. Against clip+sgd
    # (clip+AdamW for the chain): no more all-reduces, no other collective or
    # control flow, bytes within 3%, peak memory within one per-device leaf;
    # per-tensor factors are one computation, not a scalar chain per leaf.
    record = run_benchmark(
        "compiled_programs.py", tmp_path / "pod", "--pod", "--quick",
        "--pod-layouts", "unstacked", "--steps", "clip_sgd", "delta_gclip",
        "clip_adamw", "delta_gclip_adamw", "delta_gclip_per_tensor",
    )  # fmt: skip
    rows = {(r["mesh"], r["step"]): r for r in record["rows"]}
    assert {mesh for mesh, _ in rows} == {"auto", "explicit"}
    structural = ("all-reduces", "all-gathers", "reduce-scatters", "all-to-alls",
                  "collective-permutes", "control flow", "bytes", "peak memory",
                  "temporaries")  # fmt: skip
    checks = record["checks"]
    assert len(checks) == 6
    for c in checks:
        failed = set(c["failed"])
        if c["step"] == "delta_gclip_adamw":
            # skip_and_round's scalar arithmetic, each scalar a padded tile
            # in XLA's cost model: 1.037x clip+AdamW's bytes with Explicit
            # axes (1.036x in the TPU training loop; an open item). Held here
            # to 1.04x below.
            failed.discard("bytes")
        if c["step"] == "delta_gclip_per_tensor" and c["mesh"] == "explicit":
            # 9.24 MB against 8.81 MB before the one-path redesign (an open
            # item): arguments, outputs, aliases and temporaries are the
            # same to 0.5 KB, only XLA:TPU's peak-heap figure moved, and it
            # is not the selects nor the order of the per-leaf barriers
            # (both tried). Held to 0.5 MiB over the allowance below.
            failed.discard("peak memory")
        assert not failed & set(structural), c
    for mesh in ("auto", "explicit"):
        clip = rows[mesh, "clip_sgd"]
        leaves = clip["leaves"]
        sharded = clip["collectives"]["all-reduce"]["operands"]
        for step in ("delta_gclip", "delta_gclip_adamw"):
            ours = rows[mesh, step]
            # Two float32 sums per sharded leaf (one read; see the docs'
            # multi-device page), one per leaf for clip+sgd.
            assert ours["collectives"]["all-reduce"]["operands"] <= 2 * sharded
            peer = rows[mesh, "clip_adamw" if "adamw" in step else "clip_sgd"]
            assert ours["bytes_accessed"] <= 1.04 * peer["bytes_accessed"], step
        per_tensor = rows[mesh, "delta_gclip_per_tensor"]
        allowance = max(per_tensor["largest_leaf_bytes_per_device"], 1 << 20)
        assert per_tensor["peak_bytes"] <= (
            clip["peak_bytes"] + allowance + (1 << 19)
        ), per_tensor["peak_bytes"]
        # Beyond the global norm's, its state's norm and factor per leaf and
        # their slices; no per-leaf arithmetic (~19 scalar instructions a
        # leaf before).
        global_norm = rows[mesh, "delta_gclip"]["scalar_values"]
        assert per_tensor["scalar_values"] <= global_norm + 4 * leaves
        opcodes = per_tensor["scalar_opcodes"]
        for op in ("sqrt", "divide", "maximum", "minimum", "compare"):
            assert opcodes.get(op, 0) <= 2, (op, opcodes)


def test_vmapped_norm_on_cpu_reads_the_batch_once_when_finite():
    # With a batched predicate the conditional became a select that ran the
    # float64 rescaled sums on every call; the batching rule keeps one
    # conditional for the whole batch.
    x = jnp.ones((8, 256, 256))
    text = _hlo(jax.vmap(lambda t: rgc.global_norm(t)), x)
    assert _ops(text, "conditional") == 1
    assert "f64[8,256,256]" not in text.split("ENTRY")[-1].split("conditional(")[0]


def test_small_leaves_are_packed_alone_but_not_under_vmap(monkeypatch):
    # Packing saves a reduction per small leaf; under vmap the reductions
    # cover the batch anyway, and the concatenation would copy the whole
    # batched gradient (a vmapped 9k-parameter step: 1.25x clip+sgd's).
    # One device, where any two small leaves are packed (a test session may
    # have started JAX with several).
    monkeypatch.setattr(_xla_cpu.jax, "device_count", lambda: 1)
    tree = [jnp.ones((64, 64)), jnp.ones(64), jnp.ones((8, 64)), jnp.ones(2)]
    alone = _hlo(lambda t: rgc.global_norm(t), tree)
    batch = jax.tree.map(lambda x: jnp.stack([x] * 16), tree)
    vmapped = _hlo(jax.vmap(lambda t: rgc.global_norm(t)), batch)

    def plain_part(text):  # the entry computation before the rescue
        return text.split("ENTRY")[-1].split("conditional(")[0]

    assert "concatenate" in plain_part(alone)
    assert "concatenate" not in plain_part(vmapped)
    assert _ops(vmapped, "conditional") == 1


def test_per_tensor_factors_are_computed_once_not_in_every_leaf_update():
    # Computed on the vector of per-leaf norms, the factor's arithmetic was
    # copied into every leaf's update fusion, so the program (and its compile
    # time: 22 s for 500 leaves) grew quadratically with the leaf count.
    n = 240
    tree = [jnp.ones(100) for _ in range(n)]
    tx = rgc.scale_by_delta_gclip(1.0, 0.1, norm="per_tensor")
    text = _hlo(lambda g, s: tx.update(g, s), tree, tx.init(tree))
    # Ops on the vector of n sums (fusion parameters included): about one
    # per leaf now, 30 per leaf (7,229) with the vector arithmetic copied.
    vector_ops = re.findall(rf"= f32\[{n}\]", text)
    assert len(vector_ops) < 3 * n, len(vector_ops)
