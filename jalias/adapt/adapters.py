"""Adapters and the adapted model: what an adapter is, how it changes SAM3, and the model fingerprint.

`embed`: N learned token embeddings float32[N, Ct] that replace the label's Ll content tokens (N = Ll by default,
    or more: `AdaptConfig.length`, e.g. as many as the alias has). They are used only in a prompt that is exactly
    the label (START label END, then padding): `expand_label` rewrites such a row of ids / attention mask into
    START s_1..s_N END (s_i: slot ids >= the vocabulary size, which no real prompt can hold), in every path that
    lays a prompt out for the text encoder or the detector (`text_features`, `__call__`, `prompt_mask`), and
    `slot_lookup` gives a slot id its learned row at token lookup (`Sam3Module.embed_tokens`, via a Flax method
    interceptor). Every other prompt, including ones that share a token with the label ("red star" next to an
    adapter for "red ring"), keeps its ids, mask and rows: its outputs are bit-identical. Several embed adapters
    compose (one per label; each gets its own slot ids).
`lora`: per target Dense kernel W [in, out], A float32[in, r] and B float32[r, out]; the adapted kernel is
    W + (alpha / r) * A @ B (merged once into a copy of those kernels; the rest of the params are shared).
    B starts at 0, so a fresh adapter is the base model.

An `AdaptedSam3` is a `Sam3` (same API: engines, predict, export all take it). Its embed rows make a prompt's
embeddings depend on the whole prompt, so the engine's text-prefix KV cache (which reuses another prompt's
prefix) is off for it (`prefix_cacheable`), and the engine runs the text encoder over at least
`min_text_width` positions (room for the longest replacement).
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..model.sam3 import Sam3, Sam3Module
from ..tokenizer import END_ID, PAD_ID, START_ID
from .config import PROMPT_SIDE, AdaptError

FINGERPRINT_SAMPLES = 4096


@dataclass
class Adapter:
    """A trained (or fresh) adapter and its card.

    kind "embed": params {"rows": float32[Ll, Ct]}; kind "lora": params {module path: {"a": [in, r], "b": [r, out]}}
    with scale = alpha / rank. fingerprint: `model_fingerprint` of the base model it was trained for.
    """

    kind: str
    label: str
    label_ids: tuple[int, ...]
    params: dict
    fingerprint: str
    category: str = ""
    teacher: str = ""
    steps: int = 0
    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = ()
    prompt_mode: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def num_params(self) -> int:
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.params)))


# ----------------------------------------------------------------------------------------------------------------
def model_fingerprint(model: Sam3) -> str:
    """sha256 of the config and, per param leaf, its path, shape and FINGERPRINT_SAMPLES strided values rounded to
    bfloat16: the same weights stored or computed in float32 or bfloat16 share a fingerprint; another checkpoint
    or config does not. An AdaptedSam3's fingerprint is its base model's."""
    model = getattr(model, "base", model)
    h = hashlib.sha256(b"jalias-adapter-fingerprint-v1\0" + model.config.to_json().encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        size = int(np.prod(np.shape(leaf)))
        # strided on the leaf's own device: a full-size model is never copied to the host
        a = np.asarray(leaf.reshape(-1)[:: max(1, size // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES])
        h.update(f"\0{jax.tree_util.keystr(path)}|{np.shape(leaf)}\0".encode())
        h.update(np.asarray(a.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# embed
def label_match(ids, label_ids: Sequence[int]):
    """ids int[B, T] (numpy or jax) -> bool[B]: the row is exactly START label END (then anything: padding)."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    n = len(label_ids)
    if ids.shape[-1] < n + 2:
        return xp.zeros(ids.shape[:-1], bool)
    lab = np.asarray(label_ids, np.int32)
    return (ids[..., 0] == START_ID) & xp.all(ids[..., 1:1 + n] == lab, axis=-1) & (ids[..., 1 + n] == END_ID)


def expand_label(ids, mask, label_ids: Sequence[int], slots: Sequence[int]):
    """Prompt layout ids / mask int[B, T] (numpy or jax) -> the same type, [B, max(T, N + 2)]: each row that is
    exactly the label becomes START slots END PAD.. with mask 1 on START..END (N = len(slots)); every other row is
    returned as it was (padded with masked PAD columns only when T < N + 2)."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    n, t = len(slots), ids.shape[-1]
    width = max(t, n + 2)
    if width > t:
        ids = xp.concatenate([ids, xp.full(ids.shape[:-1] + (width - t,), PAD_ID, ids.dtype)], -1)
        mask = xp.concatenate([mask, xp.zeros(mask.shape[:-1] + (width - t,), mask.dtype)], -1)
    row = np.full(width, PAD_ID, np.int32)
    row[0], row[1:1 + n], row[1 + n] = START_ID, np.asarray(slots, np.int32), END_ID
    hit = label_match(ids, label_ids)[..., None]
    return (xp.where(hit, row.astype(ids.dtype), ids),
            xp.where(hit, (np.arange(width) < n + 2).astype(mask.dtype), mask))


def slot_lookup(lookup, ids, table, vocab: int):
    """Token embeddings [B, T, Ct] of ids int[B, T]: lookup(ids) for vocabulary ids, table[id - vocab] (table
    [S, Ct], the learned rows) for slot ids >= vocab. Rows without a slot id are lookup's, bit for bit."""
    ids = jnp.asarray(ids)
    slot = ids >= vocab
    out = lookup(jnp.where(slot, 0, ids))
    rows = jnp.asarray(table).astype(out.dtype)[jnp.clip(ids - vocab, 0, table.shape[0] - 1)]
    return jnp.where(slot[..., None], rows, out)


def fresh_embed(model: Sam3, label_ids: Sequence[int], length: int | None = None) -> dict:
    """Embed adapter params initialised from the label's own token embeddings: {"rows": float32[N, Ct]}, N =
    length (default: the label's token count); for N > Ll each label token's row is repeated in order ("blue
    triangle", N = 4: blue blue triangle triangle)."""
    ids = jnp.asarray(np.asarray(label_ids, np.int32))[None]
    rows = jnp.asarray(model.apply("embed_tokens", ids)[0], jnp.float32)
    n = len(label_ids) if length is None else int(length)
    return {"rows": rows[(np.arange(n) * len(label_ids)) // n]}


# ----------------------------------------------------------------------------------------------------------------
# lora
def _module_paths(params: Any) -> dict[str, tuple]:
    """"a/b/c" -> key path tuple, for every Dense kernel (a 2-D "kernel" leaf)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(p.key for p in path)
        if keys[-1] == "kernel" and np.ndim(leaf) == 2:
            out["/".join(keys[:-1])] = keys
    return out


def lora_targets(model: Sam3, patterns: Sequence[str]) -> list[str]:
    """Sorted Dense module paths matching the fnmatch patterns; AdaptError when a pattern matches nothing or a
    match is on the image side (vision / geometry encoder: cached per image, an adapter must not change it)."""
    mods = _module_paths(getattr(model, "base", model).params)
    chosen = set()
    for pat in patterns:
        hits = [m for m in mods if fnmatch.fnmatchcase(m, pat)]
        if not hits:
            raise AdaptError(f"LoRA target {pat!r} matches no Dense layer of this model (e.g. "
                             f"'text_encoder/*/self_attn/q_proj')")
        bad = [m for m in hits if not m.startswith(PROMPT_SIDE)]
        if bad:
            raise AdaptError(f"LoRA target {pat!r} matches {bad[0]!r}, which is not on the prompt side "
                             f"(allowed: {', '.join(PROMPT_SIDE)}...)")
        chosen.update(hits)
    return sorted(chosen)


def _get(tree: dict, keys: tuple):
    for k in keys:
        tree = tree[k]
    return tree


def fresh_lora(model: Sam3, targets: Sequence[str], rank: int, seed: int) -> dict:
    """{path: {"a": float32[in, r] ~ N(0, 1/in), "b": zeros[r, out]}} for each target module path."""
    base = getattr(model, "base", model).params
    mods = _module_paths(base)
    out = {}
    for i, t in enumerate(targets):
        kin, kout = np.shape(_get(base, mods[t]))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        out[t] = {"a": jax.random.normal(key, (kin, rank), jnp.float32) / np.sqrt(kin),
                  "b": jnp.zeros((rank, kout), jnp.float32)}
    return out


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """params with each target kernel W replaced by W + scale * a @ b (in W's dtype); other leaves shared.
    Differentiable in `lora` (use inside jit)."""
    mods = _module_paths(params)
    out = dict(params)
    for t, ab in lora.items():
        keys = mods[t]
        node = out
        for k in keys[:-1]:  # copy the dicts on the path only
            node[k] = dict(node[k])
            node = node[k]
        w = node["kernel"]
        node["kernel"] = (w.astype(jnp.float32) + scale * (ab["a"] @ ab["b"])).astype(w.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
class AdaptedSam3(Sam3):
    """A `Sam3` with adapters applied: `AdaptedSam3(base, [adapter, ...])` (also stacks on another AdaptedSam3).

    Checks every adapter against the base model's fingerprint (AdaptError naming both otherwise) and refuses two
    embed adapters for the same label. LoRA deltas are merged into the params once; embed rows are applied at
    token lookup. `base` is the unadapted model (params shared)."""

    def __init__(self, base: Sam3, adapters: Sequence[Adapter]):
        prior = tuple(getattr(base, "adapters", ()))
        base = getattr(base, "base", base)
        adapters = prior + tuple(adapters)
        fp = model_fingerprint(base)
        labels: dict[tuple, str] = {}
        for a in adapters:
            if a.fingerprint != fp:
                raise AdaptError(f"adapter for {a.label!r} was trained for another model or config (fingerprint "
                                 f"{a.fingerprint[:12]}, this model is {fp[:12]})")
            if a.kind == "embed":
                if tuple(a.label_ids) in labels:
                    raise AdaptError(f"two embed adapters for the label {a.label!r}: apply one per label")
                labels[tuple(a.label_ids)] = a.label
        self.__dict__.update(base.__dict__)
        self._jit = {}
        self.base, self.adapters, self.fingerprint = base, adapters, fp
        params = base.params
        for a in adapters:
            if a.kind == "lora":
                params = merge_lora(params, jax.tree_util.tree_map(jnp.asarray, a.params), a.scale)
        self.params = params
        # embed adapters: each label gets slot ids vocab + offset .. (never a real token), rows in one table
        self.vocab = int(base.config.text.vocab_size)
        self._slots, tables = [], []
        for a in adapters:
            if a.kind == "embed":
                rows = jnp.asarray(a.params["rows"], jnp.float32)
                start = self.vocab + sum(len(s) for _, s in self._slots)
                self._slots.append((tuple(int(i) for i in a.label_ids), np.arange(start, start + rows.shape[0])))
                tables.append(rows)
        self._table = jnp.concatenate(tables) if tables else None
        if self._slots and max(len(s) for _, s in self._slots) + 2 > base.config.context_length:
            raise AdaptError(f"an embed adapter has more rows than the {base.config.context_length}-token context "
                             f"holds")
        self.min_text_width = max((len(s) + 2 for _, s in self._slots), default=0)
        self.prefix_cacheable = not self._slots

    def expand(self, input_ids, attention_mask):
        """ids / mask [B, T] -> the layout the text encoder and the detector see (`expand_label` per embed
        adapter); unchanged without embed adapters."""
        for label_ids, slots in self._slots:
            input_ids, attention_mask = expand_label(input_ids, attention_mask, label_ids, slots)
        return input_ids, attention_mask

    def prompt_mask(self, input_ids, attention_mask):
        return super().prompt_mask(*self.expand(input_ids, attention_mask))

    def _intercept(self, next_fun, args, kwargs, context):
        if isinstance(context.module, Sam3Module) and context.method_name == "embed_tokens":
            return slot_lookup(lambda ids: next_fun(ids, *args[1:], **kwargs), args[0], self._table, self.vocab)
        return next_fun(*args, **kwargs)

    def apply(self, method: str, *args, params=None, **kwargs):
        if not self._slots:
            return super().apply(method, *args, params=params, **kwargs)
        if method == "text_features":
            args = (*self.expand(args[0], args[1]), *args[2:])
        elif method == "__call__":
            args = (args[0], *self.expand(args[1], args[2]), *args[3:])
        with nn.intercept_methods(self._intercept):
            return super().apply(method, *args, params=params, **kwargs)

    def with_prompt_mode(self, mode: str | None) -> "AdaptedSam3":
        if mode is None or mode == self.prompt_mode:
            return self
        return AdaptedSam3(self.base.with_prompt_mode(mode), self.adapters)


def apply_adapters(model: Sam3, adapters: Sequence[Adapter]) -> Sam3:
    """model with adapters applied (model itself when there are none)."""
    return AdaptedSam3(model, adapters) if adapters else model
