"""Which token ids a search may propose (special ids out, optional whitelist, optional ASCII word pieces) and
drawing candidates from them."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from jalias.search.base import SearchConfig

CLIP_SPECIAL_IDS = (49406, 49407)  # <|startoftext|>, <|endoftext|> (also CLIP's padding id)

_WORD_PIECE_RE = re.compile(r"[A-Za-z0-9]+")


def ascii_word_piece_mask(strings: Sequence[str]) -> np.ndarray:
    """bool[len(strings)]: True where a token string (CLIP style, '</w>' marks a word end) is ASCII letters/digits."""
    out = np.zeros(len(strings), bool)
    for i, s in enumerate(strings):
        piece = s[:-4] if s.endswith("</w>") else s
        out[i] = _WORD_PIECE_RE.fullmatch(piece.strip()) is not None
    return out


def _tokenizer_strings() -> Optional[list[str]]:
    try:
        from jalias.tokenizer import token_strings
    except ImportError:
        return None
    return list(token_strings())


def allowed_token_ids(
    config: SearchConfig,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    token_strings: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """int32[M] sorted ids a method may propose: not special, in config.allowed_tokens if given, and ASCII
    word pieces if config.ascii_only (token strings from the argument, else jalias.tokenizer)."""
    ok = np.ones(vocab_size, bool)
    for s in tuple(CLIP_SPECIAL_IDS) + tuple(special_ids):
        if 0 <= s < vocab_size:
            ok[s] = False
    if config.allowed_tokens is not None:
        wl = np.asarray(config.allowed_tokens, dtype=np.int64)
        if wl.size and (wl.min() < 0 or wl.max() >= vocab_size):
            raise ValueError(f"allowed_tokens has ids outside [0, {vocab_size})")
        keep = np.zeros(vocab_size, bool)
        keep[wl] = True
        ok &= keep
    if config.ascii_only:
        strings = token_strings if token_strings is not None else _tokenizer_strings()
        if strings is None:
            if config.allowed_tokens is None:
                raise ValueError("ascii_only needs jalias.tokenizer.token_strings() or an explicit allowed_tokens")
        else:
            mask = np.zeros(vocab_size, bool)
            n = min(vocab_size, len(strings))
            mask[:n] = ascii_word_piece_mask(strings[:n])
            ok &= mask
    ids = np.flatnonzero(ok).astype(np.int32)
    if ids.size == 0:
        raise ValueError("the vocabulary filter leaves no token to propose")
    return ids


def random_ids(allowed: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """int32[length] tokens drawn uniformly (with replacement) from the allowed ids int32[M]."""
    return allowed[rng.integers(allowed.size, size=length)].astype(np.int32)


def initial_ids(config: SearchConfig, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int32[length] starting sequence: random allowed tokens, or the label padded with random allowed tokens."""
    ids = random_ids(allowed, config.length, rng)
    if config.init == "label":
        label = np.asarray(config.label_ids, dtype=np.int32)
        ids[: label.size] = label
    return ids


def mutate(ids: np.ndarray, allowed: np.ndarray, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """int32[L] copy of ids int32[L] with n distinct random positions set to other random allowed tokens."""
    out = np.asarray(ids, dtype=np.int32).copy()
    m = allowed.size
    for pos in rng.permutation(out.size)[:n]:
        c = int(np.searchsorted(allowed, out[pos]))
        if c < m and allowed[c] == out[pos] and m > 1:
            j = int(rng.integers(m - 1))
            j += j >= c  # skip the current token
        else:
            j = int(rng.integers(m))
        out[pos] = allowed[j]
    return out
