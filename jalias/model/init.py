"""Random SAM3 parameters that make the model prompt-sensitive.

transformers' default init (std 0.02 everywhere) leaves SAM3 almost prompt-blind: every score ~0.5 and near
identical masks for any prompt, which makes parity and search tests weak. This init scales each weight by
1/sqrt(fan_in) (signals keep unit scale through every stage), jitters norms and biases, and spreads the
reference boxes, so masks, scores and presence genuinely depend on the prompt.
"""

from __future__ import annotations

import numpy as np

from .config import Sam3Config
from .shapes import param_shapes


def random_params(config: Sam3Config, seed: int = 0, gain: float = 1.0, presence_bias: float = 0.0) -> dict:
    """Nested dict of float32 numpy arrays with the Flax param tree of `Sam3Module(config)`."""
    shapes = param_shapes(config)
    geometry = {k: v for k, v in shapes.items() if k[0] == "geometry_encoder"}
    params = random_tree({k: v for k, v in shapes.items() if k[0] != "geometry_encoder"}, seed, gain)
    if geometry:  # its own stream: every other weight is the same with or without the geometry encoder
        params.update(random_tree(geometry, seed + 7919, gain))
    if presence_bias:
        params["detr_decoder"]["presence_head"]["layer3"]["bias"] += np.float32(presence_bias)
    return params


def random_tree(shapes: dict[tuple[str, ...], tuple[int, ...]], seed: int = 0, gain: float = 1.0) -> dict:
    """Fan-in-scaled random params for any module given its {param path: shape} (see model.shapes)."""
    rng = np.random.default_rng(seed)
    params: dict = {}
    for path, shape in sorted(shapes.items()):
        leaf, owner = path[-1], (path[-2] if len(path) > 1 else "")
        if leaf == "kernel":
            if len(shape) == 4 and owner.startswith("scale_layers"):  # transposed conv [kh, kw, out, in]
                fan_in = shape[-1]
            elif len(shape) == 4:  # conv [kh, kw, in, out]
                fan_in = shape[0] * shape[1] * shape[2]
            else:  # dense [in, out]
                fan_in = shape[0]
            arr = rng.normal(0, gain / np.sqrt(fan_in), shape)
        elif leaf == "scale":
            arr = 1.0 + 0.1 * rng.normal(size=shape)
        elif leaf == "bias":
            arr = 0.1 * rng.normal(size=shape)
        else:  # token/position/query embeddings; reference_points: sigmoid(N(0,1)) spreads boxes over the image
            arr = rng.normal(0, 1.0, shape)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[leaf] = arr.astype(np.float32)
    return params


PROBE_NAMES = ("pixel_decoder", "query_proj", "text_proj")


def probe(config: Sam3Config, params: dict, pixel_values, ids, mask, names=PROBE_NAMES) -> tuple[dict, dict]:
    """One full forward (pixel_values [B, 3, S, S], ids/mask [B, T]) that also captures the outputs of the
    submodules named in `names`. Returns (outputs, {name: numpy array of that module's first output}); used to
    calibrate random weights so predictions depend on the prompt."""
    import jax

    from .sam3 import Sam3Module

    fn = jax.jit(lambda p, *a: Sam3Module(config).apply({"params": p}, *a, mutable=["intermediates"],
                                                          capture_intermediates=lambda m, _: m.name in names))
    out, state = fn(params, pixel_values, ids, mask)
    found = {}
    jax.tree_util.tree_map_with_path(
        lambda path, x: found.setdefault(next(k.key for k in path if getattr(k, "key", None) in names), np.asarray(x)),
        state["intermediates"])
    return out, found


def centre_masks(params: dict, pixel_embedding: np.ndarray) -> None:
    """Set the mask head's instance-projection bias (in place) so that the mean probed pixel embedding
    (pixel_embedding [..., C], from `probe`) projects to zero: masks then cover part of the image, not all of it."""
    proj = params["mask_decoder"]["instance_projection"]
    mean = pixel_embedding.reshape(-1, pixel_embedding.shape[-1]).mean(0)
    proj["bias"] = (-mean @ proj["kernel"][0, 0]).astype(np.float32)
