"""A Llama-style decoder's optimizer step, compiled for TPU pods without a TPU.

The pieces of ``compiled_programs.py --pod``: the model's parameters as
sharded ``ShapeDtypeStruct`` s (2-D ``("fsdp", "tensor")`` sharding in the
style of MaxText, norms replicated), the steps compared, the meshes, and what
is read from each compiled program:

* collectives by kind (all-reduce, all-gather, reduce-scatter, all-to-all,
  collective-permute), each with its operand count and bytes;
* conditionals and while loops;
* XLA's ``bytes accessed``, the temporaries and the peak memory;
* the scalar values the entry computation holds (instructions whose result is
  one number), by opcode: XLA gives each its own buffer, and unfused scalar
  arithmetic is where a per-leaf computation shows;
* trace (lowering) and compile time.

The model (``LlamaConfig``) defaults to Llama 2 7B: vocab 32,000, d_model
4,096, 32 layers, MLP 11,008, 6.74B parameters. ``stacked`` holds each layer
weight of all layers in one leaf (12 leaves, as under ``nn.scan``);
``unstacked`` one leaf per layer weight (291 leaves).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import Counter
from typing import Any

STEPS = (
    "sgd",
    "clip_sgd",
    "delta_gclip",
    "clip_sgd_momentum",
    "delta_gclip_momentum",
    "clip_adamw",
    "delta_gclip_adamw",
    "delta_gclip_per_tensor",
)
# Each δ-GClip step against its Optax counterpart.
COUNTERPART = {
    "delta_gclip": "clip_sgd",
    "delta_gclip_momentum": "clip_sgd_momentum",
    "delta_gclip_adamw": "clip_adamw",
    "delta_gclip_per_tensor": "clip_sgd",
}
LAYOUTS = ("stacked", "unstacked")
MESH_KINDS = ("auto", "explicit")
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 32_000
    d_model: int = 4_096
    layers: int = 32
    mlp: int = 11_008


# A parameter: its shape and partition spec (a mesh axis name or None per dim).
Param = tuple[tuple[int, ...], tuple[Any, ...]]


# Kernels: the input dimension over "fsdp" and the output over "tensor"
# (the projections back to d_model the other way round); norms replicated.
def _layer_weights(
    c: LlamaConfig,
) -> dict[str, tuple[tuple[int, ...], tuple[Any, ...]]]:
    d, f = c.d_model, c.mlp
    fsdp_tensor = ("fsdp", "tensor")
    tensor_fsdp = ("tensor", "fsdp")
    return {
        "attention_norm": ((d,), (None,)),
        "wq": ((d, d), fsdp_tensor),
        "wk": ((d, d), fsdp_tensor),
        "wv": ((d, d), fsdp_tensor),
        "wo": ((d, d), tensor_fsdp),
        "mlp_norm": ((d,), (None,)),
        "w_gate": ((d, f), fsdp_tensor),
        "w_up": ((d, f), fsdp_tensor),
        "w_down": ((f, d), tensor_fsdp),
    }


def llama_params(c: LlamaConfig, layout: str) -> dict[str, Param]:
    """``{path: (shape, partition spec)}`` of the decoder's parameters."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out: dict[str, Param] = {"embed": ((c.vocab, c.d_model), ("tensor", "fsdp"))}
    layer = _layer_weights(c)
    if layout == "stacked":
        for name, (shape, spec) in layer.items():
            out[f"layers/{name}"] = ((c.layers, *shape), (None, *spec))
    else:
        for i in range(c.layers):
            for name, (shape, spec) in layer.items():
                out[f"layer{i}/{name}"] = (shape, spec)
    out["final_norm"] = ((c.d_model,), (None,))
    out["lm_head"] = ((c.d_model, c.vocab), ("fsdp", "tensor"))
    return out


def parameter_count(c: LlamaConfig) -> int:
    return sum(math.prod(s) for s, _ in llama_params(c, "stacked").values())


def make_tx(name: str) -> Any:
    import optax

    import rgclip_optax as rgc

    lr, gamma, delta = 0.1, 1.0, 1e-3
    steps = {
        "sgd": lambda: optax.sgd(lr),
        "clip_sgd": lambda: optax.chain(
            optax.clip_by_global_norm(gamma), optax.sgd(lr)
        ),
        "delta_gclip": lambda: rgc.delta_gclip(lr, gamma, delta),
        "clip_sgd_momentum": lambda: optax.chain(
            optax.clip_by_global_norm(gamma), optax.sgd(lr, momentum=0.9)
        ),
        "delta_gclip_momentum": lambda: rgc.delta_gclip(lr, gamma, delta, momentum=0.9),
        "clip_adamw": lambda: optax.chain(
            optax.clip_by_global_norm(gamma), optax.adamw(1e-4, weight_decay=0.1)
        ),
        "delta_gclip_adamw": lambda: rgc.skip_and_round(
            optax.chain(
                rgc.scale_by_delta_gclip(gamma, delta, wide_updates=True),
                optax.adamw(1e-4, weight_decay=0.1),
            )
        ),
        "delta_gclip_per_tensor": lambda: rgc.delta_gclip(
            lr, gamma, delta, norm="per_tensor"
        ),
    }
    if name not in steps:
        raise ValueError(f"step must be one of {STEPS}, got {name!r}")
    return steps[name]()


def tpu_mesh(topology: str, tensor: int, kind: str) -> Any:
    """A ``("fsdp", "tensor")`` mesh over a deviceless TPU topology.

    ``topology`` is ``"<chip>:<shape>"`` with optional ``,``-separated
    options: ``megacore`` (``chip_config_name="megacore"``, v4) and ``split``
    (``allow_split_physical_axes=True``, which v5p needs from 8x8x8 up).
    """
    from jax.experimental import mesh_utils, topologies
    from jax.sharding import AxisType, Mesh

    name, *options = topology.split(",")
    unknown = set(options) - {"megacore", "split"}
    if unknown:
        raise ValueError(
            f"unknown topology option(s) {sorted(unknown)} in {topology!r}"
        )
    kwargs: dict[str, Any] = {}
    if "megacore" in options:
        kwargs["chip_config_name"] = "megacore"
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    n = len(topo.devices)
    if n % tensor:
        raise ValueError(f"tensor={tensor} does not divide {n} devices of {name}")
    axis_type = AxisType.Explicit if kind == "explicit" else AxisType.Auto
    devices = mesh_utils.create_device_mesh(
        (n // tensor, tensor),
        devices=topo.devices,
        allow_split_physical_axes="split" in options,
    )
    return Mesh(devices, ("fsdp", "tensor"), axis_types=(axis_type, axis_type))


def abstract_inputs(mesh: Any, params: dict[str, Any], dtype: str, tx: Any) -> Any:
    """(params, state) as sharded ``ShapeDtypeStruct`` s."""
    import jax
    from compiled_programs import sharded_state
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    specs = {k: P(*spec) for k, (_, spec) in params.items()}
    abstract = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, specs[k]))
        for k, (shape, _) in params.items()
    }
    state = sharded_state(tx, abstract, specs, mesh)
    return abstract, state


def compile_step(mesh: Any, params: dict[str, Any], dtype: str, step: str) -> Any:
    """``(compiled, trace_s, compile_s)`` for the donated step."""
    import jax
    import optax

    tx = make_tx(step)
    p, s = abstract_inputs(mesh, params, dtype, tx)

    def train_step(p: Any, s: Any, g: Any) -> Any:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    train_step.__name__ = f"step_{step}"
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(p, s, p)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
             "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([\w\-]+)\(")


def _type_bytes(text: str) -> tuple[int, int]:
    """(arrays, bytes) of an HLO result type: an array or a tuple of them."""
    n = total = 0
    for dtype, dims in _ARRAY.findall(text):
        n += 1
        size = math.prod(int(d) for d in dims.split(",") if d)
        total += size * _ITEMSIZE.get(dtype, 4)
    return n, total


def entry_computation(hlo: str) -> list[str]:
    lines = hlo.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("ENTRY"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return lines[start + 1 : end]


def hlo_report(hlo: str) -> dict[str, Any]:
    """Collectives, control flow and the entry computation's scalar values."""
    collectives: dict[str, dict[str, int]] = {
        k: {"count": 0, "operands": 0, "bytes": 0} for k in COLLECTIVES
    }
    control: Counter[str] = Counter()
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        result, opcode = m.groups()
        base = opcode.removesuffix("-start")
        if base in collectives and not opcode.endswith("-done"):
            n, nbytes = _type_bytes(result)
            # An async start's result also holds its operands.
            if opcode.endswith("-start") and base == "all-reduce":
                n, nbytes = n // 2 or n, nbytes // 2 or nbytes
            collectives[base]["count"] += 1
            collectives[base]["operands"] += n
            collectives[base]["bytes"] += nbytes
        if opcode in ("conditional", "while"):
            control[opcode] += 1
    scalars: Counter[str] = Counter()
    for line in entry_computation(hlo):
        m = _INSTRUCTION.match(line)
        if m and re.fullmatch(
            r"(pred|[subf]\d+|bf16)\[\](\{[^}]*\})?", m.group(1).strip()
        ):
            scalars[m.group(2)] += 1
    return {
        "collectives": collectives,
        "conditionals": control["conditional"],
        "whiles": control["while"],
        "scalar_values": sum(scalars.values()),
        "scalar_opcodes": dict(scalars.most_common()),
    }


def measure(compiled: Any) -> dict[str, Any]:
    row = hlo_report(compiled.as_text())
    mem = compiled.memory_analysis()
    row["temp_bytes"] = int(mem.temp_size_in_bytes)
    peak = getattr(mem, "peak_memory_in_bytes", 0)
    row["peak_bytes"] = int(peak) if peak else None
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    row["bytes_accessed"] = float(cost["bytes accessed"]) if cost else None
    return row


def largest_leaf_bytes(mesh: Any, params: dict[str, Any], dtype: str) -> int:
    """The largest per-device shard of one parameter, in bytes."""
    import jax.numpy as jnp

    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    largest = 0
    for shape, spec in params.values():
        per_device = [
            d // (sizes[a] if a else 1) for d, a in zip(shape, spec, strict=True)
        ]
        largest = max(largest, math.prod(per_device))
    return largest * jnp.dtype(dtype).itemsize


def check(row: dict[str, Any], peer: dict[str, Any], slack: int) -> list[str]:
    """The issue's targets for one δ-GClip row against its counterpart."""
    failed = []
    ar, peer_ar = (x["collectives"]["all-reduce"] for x in (row, peer))
    if ar["count"] > peer_ar["count"]:
        failed.append("all-reduces")
    for kind in COLLECTIVES[1:]:
        if row["collectives"][kind]["count"] > peer["collectives"][kind]["count"]:
            failed.append(kind + "s")
    if row["conditionals"] or row["whiles"]:
        failed.append("control flow")
    if row["bytes_accessed"] > 1.03 * peer["bytes_accessed"]:
        failed.append("bytes")
    if row["peak_bytes"] and peer["peak_bytes"]:
        if row["peak_bytes"] > peer["peak_bytes"] + slack:
            failed.append("peak memory")
    elif row["temp_bytes"] > peer["temp_bytes"] + slack:
        failed.append("temporaries")
    limit = 2.0 if row["step"].endswith("per_tensor") else 1.2
    if row["compile_s"] > limit * peer["compile_s"]:
        failed.append(f"compile time > {limit}x")
    return failed


# The pods of the committed table: the largest v4 and v5p topologies this
# libtpu (0.0.42.1) compiles for, and a v5e pod. A 64x4 mesh splits the
# v5e's 16-chip physical axes, and from 8x8x8 up the v5p's too.
TOPOLOGIES = ("v5e:16x16,split", "v4:4x4x8,megacore", "v5p:16x16x16,split")
QUICK_TOPOLOGIES = ("v5e:4x4",)
QUICK_MODEL = LlamaConfig(vocab=8_000, d_model=512, layers=4, mlp=1_408)


def run(args: Any) -> dict[str, Any]:
    """Compile every case of ``args`` (see ``compiled_programs.py --pod``)."""
    import jax

    model = (
        QUICK_MODEL
        if args.quick
        else LlamaConfig(
            vocab=args.vocab, d_model=args.d_model, layers=args.layers, mlp=args.mlp
        )
    )
    topologies = args.topologies or (QUICK_TOPOLOGIES if args.quick else TOPOLOGIES)
    rows = []
    for topology in topologies:
        for kind in args.meshes:
            mesh = tpu_mesh(topology, args.tensor, kind)
            for layout in args.layouts:
                params = llama_params(model, layout)
                for step in args.steps:
                    compiled, trace_s, compile_s = compile_step(
                        mesh, params, args.dtype, step
                    )
                    row = {
                        "topology": topology,
                        "mesh": kind,
                        "mesh_shape": list(mesh.devices.shape),
                        "layout": layout,
                        "leaves": len(params),
                        "step": step,
                        "trace_s": round(trace_s, 3),
                        "compile_s": round(compile_s, 3),
                        "largest_leaf_bytes_per_device": largest_leaf_bytes(
                            mesh, params, args.dtype
                        ),
                    }
                    row |= measure(compiled)
                    del compiled
                    rows.append(row)
                    ar = row["collectives"]["all-reduce"]
                    print(
                        f"{topology} {kind} {layout} {step}: all-reduces "
                        f"{ar['count']} ({ar['operands']} operands), scalars "
                        f"{row['scalar_values']}, compile {compile_s:.1f} s",
                        flush=True,
                    )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
        "libtpu": _libtpu_version(),
        "model": dataclasses.asdict(model),
        "parameters": parameter_count(model),
        "dtype": args.dtype,
        "tensor": args.tensor,
        "rows": rows,
        "checks": checks(rows),
    }


def _libtpu_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "unknown"


def checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each δ-GClip row against its counterpart's row of the same case."""

    def case(r: dict[str, Any]) -> tuple[str, ...]:
        return (r["topology"], r["mesh"], r["layout"])

    by_step = {(*case(r), r["step"]): r for r in rows}
    out = []
    for r in rows:
        peer = by_step.get((*case(r), COUNTERPART.get(r["step"], "")))
        if peer is None:
            continue
        slack = max(1 << 20, r["largest_leaf_bytes_per_device"])
        out.append(
            {"topology": r["topology"], "mesh": r["mesh"], "layout": r["layout"],
             "step": r["step"], "failed": check(r, peer, slack)}
        )  # fmt: skip
    return out


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def markdown(record: dict[str, Any]) -> str:
    m = record["model"]
    lines = [
        "# Optimizer steps compiled for TPU pods",
        "",
        f"{record['date']}, jax {record['jax']}, libtpu {record['libtpu']}. "
        f"A Llama-style decoder, {record['parameters'] / 1e9:.2f}B parameters "
        f"(vocab {m['vocab']:,}, d_model {m['d_model']:,}, {m['layers']} layers, "
        f"MLP {m['mlp']:,}) in {record['dtype']}, given as sharded "
        '`ShapeDtypeStruct`s: kernels over a `("fsdp", "tensor")` mesh '
        f"(tensor = {record['tensor']}), norms replicated. The donated step "
        "`params, state = step(params, state, grads)` was compiled without a "
        "TPU (`benchmarks/compiled_programs.py --pod`); nothing was run.",
        "",
        "`all-reduces` is instructions / operands; `scalars` the entry "
        "computation's instructions with a one-number result; `bytes` XLA's "
        "cost model over the counterpart's (clip+sgd for `delta_gclip` and "
        "`per_tensor`, clip+sgd(m) for momentum, clip+AdamW for the "
        "δ-GClip chain); `compile` the XLA compile time, `trace` tracing and "
        "lowering, in seconds (one compile each, on a shared 2-core machine).",
        "",
        "| topology | mesh | layout | step | all-reduces | other collectives "
        "| cond/while | scalars | temp MiB | peak MiB | bytes vs counterpart "
        "| trace s | compile s | compile vs counterpart |",
        "|" + "---|" * 14,
    ]
    rows = record["rows"]
    by_step = {(r["topology"], r["mesh"], r["layout"], r["step"]): r for r in rows}
    for r in rows:
        peer = by_step.get(
            (r["topology"], r["mesh"], r["layout"], COUNTERPART.get(r["step"], ""))
        )
        ar = r["collectives"]["all-reduce"]
        other = ", ".join(
            f"{k} {v['count']}"
            for k, v in r["collectives"].items()
            if k != "all-reduce" and v["count"]
        )
        shape = "x".join(map(str, r["mesh_shape"]))
        lines.append(
            "| " + " | ".join([
                f"{r['topology']} ({shape})", r["mesh"], r["layout"], r["step"],
                f"{ar['count']} / {ar['operands']}", other or "none",
                f"{r['conditionals']}/{r['whiles']}", str(r["scalar_values"]),
                _mib(r["temp_bytes"]), _mib(r["peak_bytes"]),
                f"{r['bytes_accessed'] / peer['bytes_accessed']:.3f}" if peer else "–",
                f"{r['trace_s']:.1f}", f"{r['compile_s']:.1f}",
                f"{r['compile_s'] / peer['compile_s']:.2f}" if peer else "–",
            ]) + " |"
        )  # fmt: skip
    failed = [c for c in record["checks"] if c["failed"]]
    lines += [
        "",
        "Targets against the counterpart: no more all-reduces, no other "
        "collective, no control flow, bytes ≤ 1.03×, peak memory ≤ the "
        "counterpart's + one largest per-device leaf (at least 1 MiB), "
        "compile time ≤ 1.2× (≤ 2× for `per_tensor`). "
        f"{len(record['checks']) - len(failed)} of {len(record['checks'])} "
        "δ-GClip rows pass.",
    ]
    for c in failed:
        lines.append(
            f"- FAIL {c['topology']} {c['mesh']} {c['layout']} {c['step']}: "
            + ", ".join(c["failed"])
        )
    return "\n".join(lines) + "\n"
