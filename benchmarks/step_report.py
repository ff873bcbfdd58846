"""The step benchmark's targets and markdown table."""

from __future__ import annotations

from typing import Any

# Table order; step_overhead.py takes its choices from here.
OPTIMIZERS = ("delta_gclip", "clip_sgd", "sgd", "adam", "torch")


def check_targets(record: dict[str, Any]) -> dict[str, Any]:
    """Each target: pass/fail, with the offending cases named."""
    fails: dict[str, list[str]] = {
        "clip_sgd_1.05": [],
        "sgd_1.4": [],
        "memory_1pct": [],
        "bandwidth_70pct": [],
    }
    gpu = record["device"]["platform"] == "gpu"
    for case in record["cases"]:
        r = case["results"]
        label = f"{case['tree']}/{case['dtype']}"
        d = r.get("delta_gclip")
        if not d:
            continue
        if "ratio_to_clip_sgd" in d and d["ratio_to_clip_sgd"] > 1.05:
            fails["clip_sgd_1.05"].append(f"{label}: {d['ratio_to_clip_sgd']:.3f}")
        if "ratio_to_sgd" in d and d["ratio_to_sgd"] > 1.4:
            fails["sgd_1.4"].append(f"{label}: {d['ratio_to_sgd']:.3f}")
        peak, ref = (
            d["memory"].get("peak_bytes"),
            r.get("clip_sgd", {}).get("memory", {}),
        )
        if (
            peak is not None
            and ref.get("peak_bytes")
            and peak > 1.01 * ref["peak_bytes"]
        ):
            fails["memory_1pct"].append(f"{label}: {peak} vs {ref['peak_bytes']} bytes")
        if (
            gpu
            and case["params"] >= 10_000_000
            and d["fraction_of_copy_bandwidth"] < 0.7
        ):
            fails["bandwidth_70pct"].append(
                f"{label}: {d['fraction_of_copy_bandwidth']:.2f}"
            )
    out: dict[str, Any] = {k: {"pass": not v, "failures": v} for k, v in fails.items()}
    if not gpu:
        out["bandwidth_70pct"] = {"pass": None, "note": "a GPU target: not checked"}
    if record["end_to_end"]:
        ratios = {
            k: v["ratio_delta_gclip_to_sgd"] for k, v in record["end_to_end"].items()
        }
        out["end_to_end_2pct"] = {
            "pass": all(v <= 1.02 for v in ratios.values()),
            "ratios": ratios,
        }
    return out


VERDICT = {True: "PASS", False: "FAIL", None: "n/a"}


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g}"


def markdown(record: dict[str, Any]) -> str:
    dev = record["device"]
    names = [n for n in OPTIMIZERS if any(n in c["results"] for c in record["cases"])]
    lines = [
        f"# Optimizer step cost: {dev['device_kind']} ({dev['platform']}), "
        f"{record['date']}",
        "",
        f"{dev['cpu_count']} CPU cores ({dev['cpu']}), jax {dev['jax']}, optax "
        f"{dev['optax']}, torch {dev['torch'] or 'not installed'}. Copy bandwidth "
        f"measured in this run: **{record['copy_bandwidth_gb_per_s']:.1f} GB/s**. "
        f"Median of {record['settings']['samples']} interleaved samples; "
        "[q25–q75] in brackets; times in ms.",
        "",
        "| tree | dtype | params | leaves | "
        + " | ".join(f"{n} ms" for n in names)
        + " | δ/sgd | δ/clip+sgd | δ GB/s (% copy) | δ compile s"
        + " | peak MB δ / clip+sgd |",
        "|" + "---|" * (8 + len(names)),
    ]
    for c in record["cases"]:
        r = c["results"]
        cells = []
        for n in names:
            x = r.get(n)
            cells.append(
                f"{ms(x['median_s'])} [{ms(x['q25_s'])}–{ms(x['q75_s'])}]"
                if x and "median_s" in x
                else "-"
            )
        d = r.get("delta_gclip", {})
        mem = d.get("memory", {}).get("peak_bytes")
        ref = r.get("clip_sgd", {}).get("memory", {}).get("peak_bytes")
        lines.append(
            f"| {c['tree']} | {c['dtype']} | {c['params'] / 1e6:.1f}M | {c['leaves']}"
            + " | "
            + " | ".join(cells)
            + f" | {d.get('ratio_to_sgd', float('nan')):.3f}"
            + f" | {d.get('ratio_to_clip_sgd', float('nan')):.3f}"
            + f" | {d.get('gb_per_s', float('nan')):.1f} "
            f"({100 * d.get('fraction_of_copy_bandwidth', float('nan')):.0f}%)"
            + f" | {d.get('compile_s', float('nan')):.2f}"
            + (f" | {mem / 1e6:.1f} / {ref / 1e6:.1f} |" if mem and ref else " | - |")
        )
    skipped = [
        f"{n} on {c['tree']}/{c['dtype']} ({x['skipped']})"
        for c in record["cases"]
        for n, x in c["results"].items()
        if "skipped" in x
    ]
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    e2e = record["end_to_end"]
    if e2e:
        lines += ["", "End to end (the examples' training step, synthetic inputs):", ""]
        lines += [
            "| workload | batch | sgd ms | δ-GClip ms | ratio |",
            "|---|---|---|---|---|",
        ]
        for k, v in e2e.items():
            s, d = v["results"]["sgd"], v["results"]["delta_gclip"]
            lines.append(
                f"| {k} | {v['batch']} | {1e3 * s['median_s']:.3g} | "
                f"{1e3 * d['median_s']:.3g} | {v['ratio_delta_gclip_to_sgd']:.3f} |"
            )
    lines += ["", "Targets:", ""]
    for k, v in record["targets"].items():
        detail = "; ".join(v.get("failures", [])) or v.get("note", "")
        if k == "end_to_end_2pct":
            detail = ", ".join(f"{w} {r:.3f}" for w, r in v["ratios"].items())
        lines.append(
            f"- {k}: {VERDICT[v['pass']]}" + (f" ({detail})" if detail else "")
        )
    return "\n".join(lines) + "\n"
