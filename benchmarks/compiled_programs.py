"""What one optimizer step compiles to on CPU, TPU and an H100, without the device.

Compiles the donated step ``params, state <- step(params, state, grads)``
(``tx.update`` + ``optax.apply_updates``) for

* ``sgd``: ``optax.sgd``;
* ``clip_sgd``: ``optax.chain(optax.clip_by_global_norm(1), optax.sgd)``;
* ``delta_gclip``: ``rgc.delta_gclip`` (the paper's method, no momentum);
* ``delta_gclip_momentum``: ``rgc.delta_gclip(momentum=0.9)``;
* ``delta_gclip_per_tensor``: ``rgc.delta_gclip(norm="per_tensor")``;

on the ResNet-18 and GPT-2-small trees (``benchmarks/trees.py``), in float32
and bfloat16, with the parameters replicated or sharded FSDP-style (each leaf
along its last axis where the device count divides it), and reads from the
compiled program:

* the all-gathers, all-reduces, conditionals and while loops in the optimized
  HLO;
* the temporaries (``memory_analysis``) and the bytes XLA's cost model
  charges (``bytes accessed``; ``usual-path`` when the program has no
  conditional, which the cost model would charge as if both branches ran);
* on the H100 target, the runtime thunk sequence: how many CUDA graphs a step
  launches, and whether a conditional or loop runs outside them (which copies
  its predicate to the host and blocks until the GPU is idle).

Targets (``--target``), each in its own environment:

* ``cpu``: 8 simulated CPU devices (this script sets ``XLA_FLAGS``);
* ``tpu``: deviceless TPU topologies (``pip install "jax[tpu]"``): ``v5e:2x2``
  and ``v4:2x2x1`` and ``v6e:2x2`` where this libtpu knows them;
* ``gpu``: the H100 target config (``pip install "jax[cuda12]"``), one device.

Writes ``benchmarks/results/compiled_programs_<target>.{json,md}``::

    python benchmarks/compiled_programs.py --target cpu
    .venv-tpu/bin/python benchmarks/compiled_programs.py --target tpu
    JAX_PLATFORMS=cpu .venv-gpu/bin/python benchmarks/compiled_programs.py --target gpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import pod as _pod  # noqa: E402  (benchmarks/pod.py, no jax at import)

TARGETS = ("cpu", "tpu", "gpu")
OPTIMIZERS = (
    "sgd",
    "clip_sgd",
    "clip_sgd_momentum",
    "delta_gclip",
    "delta_gclip_momentum",
    "delta_gclip_per_tensor",
)
CPU_DEVICES = 8
TPU_TOPOLOGIES = ("v5e:2x2", "v4:2x2x1", "v6e:2x2")

H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  driver_version: "12.8.0"
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, help="required without --pod")
    p.add_argument("--trees", nargs="+", default=["resnet18", "transformer"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--layouts", nargs="+", default=["replicated", "fsdp"])
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=OPTIMIZERS)
    p.add_argument(
        "--topologies", nargs="+", default=TPU_TOPOLOGIES, help="TPU topologies"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path without suffix "
        "(default benchmarks/results/compiled_programs_<target>)",
    )
    pod = p.add_argument_group(
        "--pod", "a Llama-style decoder on TPU pods (in the jax[tpu] environment)"
    )
    pod.add_argument(
        "--pod",
        action="store_true",
        help="compile the decoder's step for TPU pods; writes "
        "compiled_programs_pod[_quick].{json,md}",
    )
    pod.add_argument(
        "--quick",
        action="store_true",
        help="a 0.06B model on v5e:4x4 (for CI); the checks are the same",
    )
    pod.add_argument(
        "--pod-topologies",
        nargs="+",
        default=None,
        help="'<chip>:<shape>[,megacore][,split]' (default: "
        + ", ".join(_pod.TOPOLOGIES)
        + ")",
    )
    pod.add_argument(
        "--meshes", nargs="+", choices=_pod.MESH_KINDS, default=_pod.MESH_KINDS
    )
    pod.add_argument(
        "--pod-layouts", nargs="+", choices=_pod.LAYOUTS, default=_pod.LAYOUTS
    )
    pod.add_argument("--steps", nargs="+", choices=_pod.STEPS, default=_pod.STEPS)
    pod.add_argument("--tensor", type=int, default=4, help="tensor-parallel size")
    pod.add_argument("--dtype", default="bfloat16")
    default = _pod.LlamaConfig()
    for field in ("vocab", "d_model", "layers", "mlp"):
        pod.add_argument(
            f"--{field.replace('_', '-')}", type=int, default=getattr(default, field)
        )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 if a δ-GClip row fails a target (a regression guard)",
    )
    args = p.parse_args(argv)
    if not args.pod and args.target is None:
        p.error("--target is required (or --pod)")
    for name in ("vocab", "d_model", "layers", "mlp", "tensor"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            p.error(f"{flag} must be at least 1, got {getattr(args, name)}")
    return args


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def hlo_counts(text: str) -> dict[str, int]:
    """Collectives and control flow in an optimized HLO module's text."""
    return {
        # An op is "<type> <opcode>(" (names are "%opcode.N").
        "all_gathers": count(r"\sall-gather(-start)?\(", text),
        "all_reduces": count(r"\sall-reduce(-start)?\(", text),
        "conditionals": count(r"\sconditional\(", text),
        "whiles": count(r"\swhile\(", text),
    }


def thunk_counts(dump_dir: Path, name: str) -> dict[str, int]:
    """Top-level thunks of the GPU program named ``name`` in an XLA dump."""
    files = sorted(dump_dir.glob(f"*jit_{name}*thunk_sequence_after_thunk_passes.txt"))
    if not files:
        files = sorted(dump_dir.glob(f"*jit_{name}*thunk_sequence.txt"))
    if not files:
        raise RuntimeError(f"no thunk sequence for {name} in {dump_dir}")
    lines = files[-1].read_text().splitlines()
    # Top-level thunks are the unindented lines that name a thunk kind.
    top = [ln for ln in lines if re.match(r"^\d*:?\s?k[A-Z]\w+", ln)]
    if not top:
        top = [
            ln
            for ln in lines
            if re.match(r"^k[A-Z]\w+", ln.strip()) and ln == ln.lstrip()
        ]
    kinds = [re.search(r"k[A-Z]\w+", ln).group(0) for ln in top]  # type: ignore[union-attr]
    return {
        "thunks": len(kinds),
        "command_buffers": kinds.count("kCommandBuffer"),
        "host_syncing_control_flow": sum(
            k in ("kConditional", "kWhile") for k in kinds
        ),
        "kernels_outside_graphs": sum(k == "kKernel" for k in kinds),
    }


def make_tx(name: str) -> Any:
    import optax

    import rgclip_optax as rgc

    if name == "sgd":
        return optax.sgd(0.1)
    if name == "clip_sgd":
        return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    if name == "clip_sgd_momentum":
        return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    if name == "delta_gclip":
        return rgc.delta_gclip(0.1, 1.0, 1e-3)
    if name == "delta_gclip_momentum":
        return rgc.delta_gclip(0.1, 1.0, 1e-3, momentum=0.9)
    return rgc.delta_gclip(0.1, 1.0, 1e-3, norm="per_tensor")


def fsdp_spec(shape: tuple[int, ...], n: int) -> Any:
    from jax.sharding import PartitionSpec as P

    if shape and shape[-1] % n == 0:
        return P(*([None] * (len(shape) - 1)), "d")
    return P()


def sharded_state(tx: Any, params: Any, specs: Any, mesh: Any) -> Any:
    """``tx.init(params)`` as ``ShapeDtypeStruct`` s, each parameter-shaped
    leaf with its parameter's partition spec and the rest replicated."""
    import jax
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    abstract_state = jax.eval_shape(tx.init, params)
    state_specs = optax.tree_map_params(
        tx.init,
        lambda _, spec: spec,
        abstract_state,
        specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    return jax.tree.map(
        lambda a, spec: jax.ShapeDtypeStruct(
            a.shape,
            a.dtype,
            # Per-tensor norms are scalars in the params' tree structure.
            sharding=NamedSharding(mesh, spec if a.ndim else P()),
        ),
        abstract_state,
        state_specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def built_for(mesh: Any) -> Any:
    """``rgc.target_platform`` for the mesh's devices: deviceless TPU and GPU
    devices live beside a CPU default backend, and the shardings passed to
    ``jit`` do not tell the library which compiler the step is for."""
    import rgclip_optax as rgc

    platform = mesh.devices.flat[0].platform
    return rgc.target_platform("gpu" if platform in ("cuda", "rocm") else platform)


def compile_step(
    mesh: Any, shapes: dict[str, tuple[int, ...]], dtype: str, layout: str, opt: str
) -> Any:
    """The compiled, donated step for abstract sharded inputs."""
    import jax
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = mesh.devices.size
    specs = {k: fsdp_spec(s, n) if layout == "fsdp" else P() for k, s in shapes.items()}
    params = {
        k: jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(mesh, specs[k]))
        for k, s in shapes.items()
    }
    tx = make_tx(opt)
    state = sharded_state(tx, params, specs, mesh)

    def step(p: Any, s: Any, g: Any) -> Any:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step.__name__ = f"step_{opt}"
    with built_for(mesh):
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
    return lowered.compile()


def gpu_bytes(compiled: Any) -> float | None:
    """XLA's cost model on a GPU module, run through the CPU client."""
    import jax
    from jax._src.lib import _jax  # no public API for this (jax 0.10.2)

    try:
        module = compiled.runtime_executable().hlo_modules()[0]
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
        return float(cost["bytes accessed"])
    except Exception:  # the cost model is an aid, not a result
        return None


def measure(
    compiled: Any, target: str, dump_dir: Path | None, opt: str
) -> dict[str, Any]:
    text = compiled.as_text()
    row: dict[str, Any] = hlo_counts(text)
    mem = compiled.memory_analysis()
    row["temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
    peak = getattr(mem, "peak_memory_in_bytes", None) if mem is not None else None
    row["peak_bytes"] = int(peak) if peak else None
    if target == "gpu":
        row["bytes_accessed"] = gpu_bytes(compiled)
        assert dump_dir is not None
        row |= thunk_counts(dump_dir, f"step_{opt}")
    else:
        cost = compiled.cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        row["bytes_accessed"] = float(cost["bytes accessed"]) if cost else None
    row["usual_path_bytes"] = row["bytes_accessed"] if not row["conditionals"] else None
    return row


def meshes(args: argparse.Namespace) -> list[tuple[str, Any]]:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    if args.target == "cpu":
        devices = np.array(jax.devices()[:CPU_DEVICES])
        return [(f"cpu x{devices.size}", Mesh(devices, ("d",)))]
    from jax.experimental import topologies

    if args.target == "gpu":
        topo = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=H100
        )
        return [("H100", topologies.make_mesh(topo, (1,), ("d",)))]
    out = []
    for name in args.topologies:
        try:
            topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
        except Exception as err:  # this libtpu does not know the topology
            print(f"skipping {name}: {err}", file=sys.stderr)
            continue
        out.append((f"TPU {name}", Mesh(np.array(topo.devices).reshape(-1), ("d",))))
    return out


def pod_main(args: argparse.Namespace) -> dict[str, Any]:
    """``--pod``: the decoder's step on TPU pods, checked against Optax."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    sys.path.insert(0, str(ROOT))
    args.topologies = args.pod_topologies
    args.layouts = args.pod_layouts
    record = _pod.run(args)
    name = "compiled_programs_pod" + ("_quick" if args.quick else "")
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(_pod.markdown(record))
    print(f"wrote {out}.json and {out}.md")
    failed = [c for c in record["checks"] if c["failed"]]
    if args.strict and failed:
        raise SystemExit(f"{len(failed)} δ-GClip row(s) fail their targets: {failed}")
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.pod:
        return pod_main(args)
    dump_dir: Path | None = None
    if args.target == "cpu":
        flag = f"--xla_force_host_platform_device_count={CPU_DEVICES}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    elif args.target == "gpu":
        dump_dir = Path(tempfile.mkdtemp(prefix="xla_dump_"))
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
        ).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    else:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    sys.path.insert(0, str(ROOT))
    import jax
    import optax
    from trees import tree_shapes

    if args.target == "cpu" and jax.device_count() < CPU_DEVICES:
        raise SystemExit("XLA_FLAGS was set too late: jax was already imported")
    rows = []
    for device, mesh in meshes(args):
        layouts = args.layouts if mesh.devices.size > 1 else ["replicated"]
        for tree in args.trees:
            shapes = tree_shapes(tree, 1.0)
            largest = max(math.prod(s) for s in shapes.values())
            for dtype in args.dtypes:
                for layout in layouts:
                    for opt in args.optimizers:
                        compiled = compile_step(mesh, shapes, dtype, layout, opt)
                        row = {
                            "device": device,
                            "tree": tree,
                            "dtype": dtype,
                            "layout": layout,
                            "optimizer": opt,
                            "largest_leaf_bytes_per_device": largest
                            * jax.numpy.dtype(dtype).itemsize
                            // (mesh.devices.size if layout == "fsdp" else 1),
                        }
                        row |= measure(compiled, args.target, dump_dir, opt)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    record = {
        "target": args.target,
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "rows": rows,
        "checks": check_targets(rows),
    }
    out = (
        args.out or ROOT / "benchmarks" / "results" / f"compiled_programs_{args.target}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {out}.json and {out}.md")
    return record


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each δ-GClip row against clip+sgd's row of the same case.

    * no more all-gathers, and (TPU and GPU) no more all-reduces;
    * no conditional or loop (on GPU: no host-syncing control flow, and as
      many CUDA graphs);
    * temporaries, and peak memory where XLA reports it, at most clip+sgd's
      plus one largest per-device leaf (at least 1 MB of slack); with
      momentum, against clip + sgd with momentum;
    * bytes accessed at most 1.03x clip+sgd's (TPU and GPU, plain and
      momentum-free δ-GClip only: momentum moves more data by design).
    """
    peers = {
        (r["device"], r["tree"], r["dtype"], r["layout"], r["optimizer"]): r
        for r in rows
        if r["optimizer"].startswith("clip_sgd")
    }
    checks = []
    for r in rows:
        if not r["optimizer"].startswith("delta_gclip"):
            continue
        # Momentum against Optax's clip + sgd with momentum, the rest against
        # clip + sgd.
        peer_name = "clip_sgd_momentum" if "momentum" in r["optimizer"] else "clip_sgd"
        peer = peers.get((r["device"], r["tree"], r["dtype"], r["layout"], peer_name))
        if peer is None:
            continue
        accel = not r["device"].startswith("cpu")
        slack = max(1 << 20, r["largest_leaf_bytes_per_device"])
        failed = []
        if r["all_gathers"] > peer["all_gathers"]:
            failed.append("all-gathers")
        if accel and r["all_reduces"] > peer["all_reduces"]:
            failed.append("all-reduces")
        if accel and (r["conditionals"] or r["whiles"]):
            failed.append("control flow")
        if r.get("host_syncing_control_flow"):
            failed.append("host sync")
        if "command_buffers" in r and r["command_buffers"] > peer["command_buffers"]:
            failed.append("CUDA graphs")
        temps = (r["temp_bytes"], peer["temp_bytes"])
        if None not in temps and temps[0] > temps[1] + slack:
            failed.append("temporaries")
        peaks = (r.get("peak_bytes"), peer.get("peak_bytes"))
        if None not in peaks and peaks[0] > peaks[1] + slack:
            failed.append("peak memory")
        if (
            accel
            and r["optimizer"] == "delta_gclip"
            and r["bytes_accessed"]
            and peer["bytes_accessed"]
            and r["bytes_accessed"] > 1.03 * peer["bytes_accessed"]
        ):
            failed.append("bytes")
        checks.append(
            {
                "device": r["device"],
                "tree": r["tree"],
                "dtype": r["dtype"],
                "layout": r["layout"],
                "optimizer": r["optimizer"],
                "failed": failed,
            }
        )
    return checks


def _mb(x: int | float | None) -> str:
    return "–" if x is None else f"{x / 2**20:.2f}"


def markdown(record: dict[str, Any]) -> str:
    rows = record["rows"]
    sgd = {
        (r["device"], r["tree"], r["dtype"], r["layout"]): r
        for r in rows
        if r["optimizer"] == "sgd"
    }
    gpu = record["target"] == "gpu"
    head = [
        "device",
        "tree",
        "dtype",
        "layout",
        "step",
        "all-gathers",
        "all-reduces",
        "cond/while",
    ]
    if gpu:
        head += ["CUDA graphs", "host-syncing", "kernels outside graphs"]
    head += ["temp MB", "peak MB", "bytes vs sgd"]
    lines = [
        f"# Compiled optimizer steps: {record['target']}",
        "",
        f"{record['date']}, jax {record['jax']}, optax {record['optax']}. "
        "Compiled without the device; nothing was run. "
        "`bytes vs sgd` is XLA's cost model (`bytes accessed`) over `optax.sgd`'s "
        "for the same case. `peak MB` is the program's peak memory where XLA "
        "reports it (parameters, state and gradient included).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        base = sgd.get((r["device"], r["tree"], r["dtype"], r["layout"]))
        ratio = "–"
        if base and r["bytes_accessed"] and base["bytes_accessed"]:
            ratio = f"{r['bytes_accessed'] / base['bytes_accessed']:.3f}"
        cells = [
            r["device"],
            r["tree"],
            r["dtype"],
            r["layout"],
            r["optimizer"],
            str(r["all_gathers"]),
            str(r["all_reduces"]),
            f"{r['conditionals']}/{r['whiles']}",
        ]
        if gpu:
            cells += [
                str(r["command_buffers"]),
                str(r["host_syncing_control_flow"]),
                str(r["kernels_outside_graphs"]),
            ]
        cells += [_mb(r["temp_bytes"]), _mb(r.get("peak_bytes")), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [c for c in record["checks"] if c["failed"]]
    lines += [
        "",
        f"Targets against clip+sgd: {len(record['checks']) - len(failed)} of "
        f"{len(record['checks'])} δ-GClip rows pass.",
    ]
    for c in failed:
        lines.append(
            f"- FAIL {c['device']} {c['tree']} {c['dtype']} {c['layout']} "
            f"{c['optimizer']}: {', '.join(c['failed'])}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
