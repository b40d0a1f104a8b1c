"""CLIP byte-level BPE tokenizer, the text front end of SAM3's CLIP text encoder.

Ids follow the 49,408-token OpenAI CLIP vocabulary (``bpe_simple_vocab_16e6.txt.gz``, vendored in
``jalias/assets``). Text is cleaned the way CLIP's original tokenizer (and the original SAM3 code) does:
ftfy fix, HTML unescape, whitespace collapse, lowercase. A prompt becomes one fixed-length row

    [START_ID, content..., END_ID, PAD_ID, ...]      int32[CONTEXT_LENGTH]

with attention mask 1 from START through END and 0 on pads, the layout of transformers' ``Sam3Processor``
(CLIPTokenizer, padding="max_length", max_length=32, truncation=True). Overlong prompts keep the start
token, the first ``context_length - 2`` content tokens and the end token.

Known difference from transformers' tokenizers-backed CLIPTokenizer: that one only NFC-normalises, so
for text ftfy or ``html.unescape`` would change (``&amp;``, curly quotes, ligatures, full-width letters)
the ids differ; on already-clean text they agree id for id (see tests/test_tokenizer.py).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

VOCAB_SIZE = 49408
START_ID = 49406
END_ID = 49407
# facebook/sam3's processor tokenizer is CLIPTokenizerFast("openai/clip-vit-base-patch32"), whose pad
# token is <|endoftext|>; pads are masked out, so the value only matters for exact parity with HF.
PAD_ID = 49407
CONTEXT_LENGTH = 32
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

VOCAB_ENV = "JALIAS_CLIP_VOCAB"
DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# sha256 of the .gz file as shipped in open_clip_torch 3.3.0 / OpenAI CLIP, and of its decompressed
# text (so a re-gzipped or plain-text copy of the same vocabulary is accepted too).
VOCAB_GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_TEXT_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"

_END_OF_WORD = "</w>"
# 256 byte symbols + 256 end-of-word byte symbols + merges + 2 specials = VOCAB_SIZE.
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
# Pre-tokenisation as in CLIP: specials, English contractions, letter runs, single digits, and runs of
# anything else that is not whitespace. Applied to lowercased text.
_PIECE_RE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE_RE = regex.compile(r"\s+")
_CACHE_LIMIT = 200_000


def _byte_symbols() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character (the byte-level BPE alphabet).

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, NBSP, soft hyphen)
    are shifted to U+0100 onward so that no vocabulary string contains whitespace or control
    characters. Insertion order is the order of the first 256 vocabulary ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleanup: ftfy fix, double HTML unescape, whitespace collapse, strip, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE_RE.sub(" ", text).strip()
    return text.lower()


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Read and verify the vocab file; returns the 48,894 merge pairs in rank order."""
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP vocab file not found: {path} (set {VOCAB_ENV} to a bpe_simple_vocab_16e6.txt.gz)"
        )
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() == VOCAB_GZ_SHA256:
        text_bytes = gzip.decompress(raw)
    else:
        try:
            text_bytes = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile):
            text_bytes = raw  # maybe an uncompressed copy; the content hash decides
        digest = hashlib.sha256(text_bytes).hexdigest()
        if digest != VOCAB_TEXT_SHA256:
            raise ValueError(
                f"CLIP vocab file {path} is corrupt or not bpe_simple_vocab_16e6 "
                f"(content sha256 {digest}, expected {VOCAB_TEXT_SHA256})"
            )
    lines = text_bytes.decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP uses only the first _NUM_MERGES merges of the file.
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"CLIP vocab file {path} has a malformed merge list")
    return merges  # type: ignore[return-value]


class ClipTokenizer:
    """CLIP BPE tokenizer over the 49,408-token vocabulary.

    Args:
      vocab_path: the ``bpe_simple_vocab_16e6.txt.gz`` file; default: ``$JALIAS_CLIP_VOCAB`` if set,
        else the vendored copy. Its sha256 is checked on load.
    """

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        if vocab_path is None:
            vocab_path = os.environ.get(VOCAB_ENV) or DEFAULT_VOCAB_PATH
        self.vocab_path = Path(vocab_path)
        merges = _read_merges(self.vocab_path)

        self._byte_to_sym = _byte_symbols()
        self._sym_to_byte = {s: b for b, s in self._byte_to_sym.items()}
        syms = list(self._byte_to_sym.values())
        tokens = syms + [s + _END_OF_WORD for s in syms] + [a + b for a, b in merges]
        tokens += [START_TOKEN, END_TOKEN]
        if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
            raise ValueError(f"CLIP vocab file {self.vocab_path} does not yield {VOCAB_SIZE} unique tokens")
        self._tokens: list[str] = tokens
        self._ids: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self._ranks: dict[tuple[str, str], int] = {pair: r for r, pair in enumerate(merges)}
        # Pre-token (byte-symbol string) -> ids; specials are matched whole by _PIECE_RE.
        self._cache: dict[str, tuple[int, ...]] = {START_TOKEN: (START_ID,), END_TOKEN: (END_ID,)}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- encoding
    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids for one pre-token already mapped to byte symbols (non-empty)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        # The last symbol carries the end-of-word marker, so word-final pieces merge differently.
        symbols = list(piece[:-1]) + [piece[-1] + _END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = tuple(self._ids[s] for s in symbols)
        with self._lock:
            if len(self._cache) > _CACHE_LIMIT:
                self._cache = {START_TOKEN: (START_ID,), END_TOKEN: (END_ID,)}
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Content token ids of one string (no start/end tokens, no truncation)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in _PIECE_RE.findall(clean_text(text)):
            if piece in (START_TOKEN, END_TOKEN):
                ids.extend(self._cache[piece])
                continue
            ids.extend(self._bpe("".join(self._byte_to_sym[b] for b in piece.encode("utf-8"))))
        return ids

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode prompts into fixed-length rows.

        Returns (input_ids int32[N, context_length], attention_mask int32[N, context_length]); a single
        str gives N=1. Rows are [START_ID, up to context_length-2 content ids, END_ID, PAD_ID...].
        """
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, (list, tuple)):
            bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
            if bad:
                raise TypeError(f"tokenize expects str or a list of str; got a list containing {bad[0]}")
        else:
            raise TypeError(f"tokenize expects str or a list of str, got {type(texts).__name__}")
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for start and end), got {context_length}")

        ids = np.full((len(texts), context_length), PAD_ID, dtype=np.int32)
        mask = np.zeros((len(texts), context_length), dtype=np.int32)
        for row, text in enumerate(texts):
            content = self.encode(text)[: context_length - 2]
            n = len(content) + 2
            ids[row, :n] = [START_ID, *content, END_ID]
            mask[row, :n] = 1
        return ids, mask

    # ---------------------------------------------------------------- decoding
    def detokenize(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of a 1D id sequence; start/end/pad ids are dropped, end-of-word marks become spaces."""
        if isinstance(ids, (str, bytes)):
            raise TypeError("detokenize expects a 1D sequence of token ids, got a string")
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"detokenize expects a 1D sequence of ids, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"detokenize expects integer ids, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
            raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got range [{arr.min()}, {arr.max()}]")
        symbols = "".join(self._tokens[i] for i in arr.tolist() if i not in (START_ID, END_ID, PAD_ID))
        # Byte symbols -> bytes -> utf-8; "</w>" is plain ASCII so it survives and becomes a space.
        text = bytes(self._sym_to_byte[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace(_END_OF_WORD, " ").strip(" ")

    def token_strings(self) -> list[str]:
        """All VOCAB_SIZE token strings in id order, in byte-symbol form.

        Printable ASCII stands for itself; word-final pieces end in "</w>" (e.g. id 2368 is "cat</w>");
        the last two are the specials.
        """
        return list(self._tokens)

    def __len__(self) -> int:
        return VOCAB_SIZE


_default: ClipTokenizer | None = None
_default_lock = threading.Lock()


def get_tokenizer() -> ClipTokenizer:
    """The shared tokenizer, built (and its vocab verified) on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = ClipTokenizer()
    return _default


def encode(text: str) -> list[int]:
    """Content token ids of one string; see ClipTokenizer.encode."""
    return get_tokenizer().encode(text)


def content_ids(texts: str | Sequence[str]) -> list[list[int]]:
    """Content token ids (no start/end/padding) of each string, ragged (`Engine.score` takes rows of one length;
    `--tokens` one row):
    content_ids("kiwi fruit") -> [[ids...]], content_ids(["a", "b c"]) -> [[...], [..., ...]]."""
    return [encode(t) for t in ([texts] if isinstance(texts, str) else list(texts))]


def tokenize(
    texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32[N, L], attention_mask int32[N, L]); see ClipTokenizer.tokenize."""
    return get_tokenizer().tokenize(texts, context_length)


def detokenize(ids: Iterable[int] | np.ndarray) -> str:
    """Text of a 1D id sequence; see ClipTokenizer.detokenize."""
    return get_tokenizer().detokenize(ids)


def round_trips(rows) -> np.ndarray:
    """bool[N]: for each content-id sequence (int[N, L] or a list of lists), whether its text tokenizes back to the
    same ids, i.e. whether typing the text (or giving it to Meta's / HF's processor) prompts with those ids.
    Sub-word pieces that merge differently ("kiwi" + "fruit" pieces), a word piece without its end-of-word
    marker, or text that cleaning changes do not."""
    tok = get_tokenizer()
    return np.array([tok.encode(tok.detokenize(r)) == [int(i) for i in r] for r in rows], bool)


def token_strings() -> list[str]:
    """The VOCAB_SIZE token strings in id order; see ClipTokenizer.token_strings."""
    return get_tokenizer().token_strings()
