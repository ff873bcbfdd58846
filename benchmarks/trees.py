"""Parameter trees of real models, as ``{path: shape}`` dicts, for the benchmarks.

* ``resnet18``: the CIFAR ResNet-18 (11.2M parameters, 62 leaves);
* ``transformer``: GPT-2 small (124M, 148 leaves);
* ``flat50m``: one leaf of 50M;
* ``small_leaves``: N leaves of 100 entries.
"""

from __future__ import annotations

TREES = ("resnet18", "transformer", "flat50m", "small_leaves")


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """The CIFAR ResNet-18's parameters (HWIO convs, BatchNorm scale/bias)."""
    shapes: dict[str, tuple[int, ...]] = {"stem/conv": (3, 3, 3, 64)}
    shapes |= {"stem/bn/scale": (64,), "stem/bn/bias": (64,)}
    c_in = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            name = f"stage{stage}/block{block}"
            shapes[f"{name}/conv1"] = (3, 3, c_in, width)
            shapes[f"{name}/conv2"] = (3, 3, width, width)
            for bn in ("bn1", "bn2"):
                shapes[f"{name}/{bn}/scale"] = (width,)
                shapes[f"{name}/{bn}/bias"] = (width,)
            if c_in != width:
                shapes[f"{name}/shortcut/conv"] = (1, 1, c_in, width)
                shapes[f"{name}/shortcut/bn/scale"] = (width,)
                shapes[f"{name}/shortcut/bn/bias"] = (width,)
            c_in = width
    shapes |= {"head/kernel": (512, 10), "head/bias": (10,)}
    return shapes


def transformer_shapes() -> dict[str, tuple[int, ...]]:
    """GPT-2 small: d=768, 12 layers, vocabulary 50257, context 1024."""
    d, vocab = 768, 50257
    shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, d), "wpe": (1024, d)}
    for i in range(12):
        layer = {
            "ln1/scale": (d,), "ln1/bias": (d,),
            "attn/qkv/kernel": (d, 3 * d), "attn/qkv/bias": (3 * d,),
            "attn/out/kernel": (d, d), "attn/out/bias": (d,),
            "ln2/scale": (d,), "ln2/bias": (d,),
            "mlp/up/kernel": (d, 4 * d), "mlp/up/bias": (4 * d,),
            "mlp/down/kernel": (4 * d, d), "mlp/down/bias": (d,),
        }  # fmt: skip
        shapes |= {f"h{i}/{k}": v for k, v in layer.items()}
    shapes |= {"ln_f/scale": (d,), "ln_f/bias": (d,)}
    return shapes


def tree_shapes(
    name: str, scale: float, small_leaves: int = 10_000
) -> dict[str, tuple[int, ...]]:
    if name == "resnet18":
        shapes = resnet18_shapes()
    elif name == "transformer":
        shapes = transformer_shapes()
    elif name == "flat50m":
        shapes = {"w": (50_000_000,)}
    else:
        shapes = {f"p{i:05d}": (100,) for i in range(small_leaves)}
    if scale < 1:  # shrink the largest dimension of each leaf, keep the leaves
        shapes = {
            k: tuple(
                max(1, round(d * scale))
                if i == max(range(len(s)), key=s.__getitem__)
                else d
                for i, d in enumerate(s)
            )
            for k, s in shapes.items()
        }
    return shapes
