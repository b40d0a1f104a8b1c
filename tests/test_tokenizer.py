"""CLIP BPE tokenizer: id-for-id parity with transformers' CLIPTokenizer (as used by Sam3Processor),
ids of the original OpenAI CLIP tokenizer, special ids, round trips, and vocab verification."""

import gzip
import html
import json

import ftfy
import numpy as np
import pytest

from jalias import tokenizer as jt

VOCAB_GZ = jt.DEFAULT_VOCAB_PATH

# Ids produced by OpenAI CLIP's SimpleTokenizer.encode (clip/simple_tokenizer.py) for these strings,
# i.e. what the original SAM3 code feeds its text encoder. Content ids only.
OPENAI_CLIP_IDS = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "Hello, World!": [3306, 267, 1002, 256],
    "&amp; café “quoted”": [261, 15304, 257, 27706, 257],
    "日本語 🐱": [39121, 44353, 34002, 508, 22979],
    "segment the ＲＥＤ ﬁre hydrant": [15615, 518, 736, 1769, 8031, 773],
    "It's 2024!": [585, 568, 273, 271, 273, 275, 256],
    "<|endoftext|>": [49407],
}

# Strings on which CLIP's ftfy/HTML cleanup is a no-op, so transformers must agree on the raw text.
PLAIN_TEXTS = [
    "a photo of a cat",
    "cat",
    "Traffic Light",
    "FIRE HYDRANT",
    "yellow school-bus, parked (left)!",
    "it's what we'll do; they've gone",
    "don't",
    "3 apples and 12.5 oranges in 2024",
    "x=0.5 y=-1.2",
    "café naïve crème brûlée",
    "e\u0301clair",  # decomposed accent: both sides NFC-normalise it
    "Straße Ålesund ÆØ",
    "日本語のテキスト 中文 한국어",
    "emoji 🐱🐶 👍🏽 🇫🇷",
    "   lots \t of\n\nwhitespace   ",
    "",
    "!!!???...",
    "a@b.com #hashtag $100 50% ^_^ ~tilde~ `tick` |pipe| \\slash/",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "person riding a horse next to a red barn",
]

# Strings that CLIP cleans (HTML entities, curly quotes, ligatures, full-width letters) but transformers'
# tokenizers-backed CLIPTokenizer does not: jalias follows CLIP (= original SAM3 training).
CLEANED_TEXTS = [
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt; &amp;amp;",
    "“quoted” ‘single’",
    "ﬁre ﬂy",
    "ＦＵＬＬ ｗｉｄｔｈ",
]

LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 10)


def _byte_alphabet() -> list[str]:
    """CLIP's 256 byte symbols in vocabulary order, derived independently of jalias.tokenizer."""
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + k) for k in range(len(rest))]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers CLIPTokenizer built offline from vocab.json/merges.txt derived from the same gz file."""
    import transformers
    lines = gzip.decompress(VOCAB_GZ.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    assert len(merges) == 48894
    alphabet = _byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    d = tmp_path_factory.mktemp("clip_hf")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = transformers.CLIPTokenizer.from_pretrained(str(d))
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    return tok


def _hf_encode(tok, texts):
    enc = tok(list(texts), padding="max_length", max_length=32, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def test_constants_and_vocab():
    strings = jt.token_strings()
    assert len(strings) == jt.VOCAB_SIZE == 49408
    assert (jt.START_ID, jt.END_ID, jt.CONTEXT_LENGTH) == (49406, 49407, 32)
    assert jt.PAD_ID == 49407  # <|endoftext|>, the pad of facebook/sam3's CLIPTokenizer
    assert strings[49406] == "<|startoftext|>" and strings[49407] == "<|endoftext|>"
    assert strings[:256] == _byte_alphabet()
    assert strings[320] == "a</w>" and strings[2368] == "cat</w>"
    assert len(set(strings)) == 49408
    # Returned list is a copy: mutating it must not corrupt the tokenizer.
    strings[320] = "zzz"
    assert jt.token_strings()[320] == "a</w>"


@pytest.mark.parametrize("text, ids", list(OPENAI_CLIP_IDS.items()))
def test_matches_openai_clip_ids(text, ids):
    assert jt.encode(text) == ids


def test_plain_texts_match_transformers(hf_tokenizer):
    ids, mask = jt.tokenize(PLAIN_TEXTS)
    ref_ids, ref_mask = _hf_encode(hf_tokenizer, PLAIN_TEXTS)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (len(PLAIN_TEXTS), 32)
    for i, text in enumerate(PLAIN_TEXTS):
        np.testing.assert_array_equal(ids[i], ref_ids[i], err_msg=repr(text))
        np.testing.assert_array_equal(mask[i], ref_mask[i], err_msg=repr(text))


def test_cleaned_texts_match_transformers_after_clip_cleanup(hf_tokenizer):
    ids, mask = jt.tokenize(CLEANED_TEXTS)
    cleaned = [html.unescape(html.unescape(ftfy.fix_text(t))) for t in CLEANED_TEXTS]
    ref_ids, ref_mask = _hf_encode(hf_tokenizer, cleaned)
    raw_ids, _ = _hf_encode(hf_tokenizer, CLEANED_TEXTS)
    for i, text in enumerate(CLEANED_TEXTS):
        np.testing.assert_array_equal(ids[i], ref_ids[i], err_msg=repr(text))
        np.testing.assert_array_equal(mask[i], ref_mask[i], err_msg=repr(text))
        # Documents the known divergence: transformers skips ftfy/HTML cleanup.
        assert not np.array_equal(ids[i], raw_ids[i]), repr(text)


def test_truncation_keeps_start_30_tokens_and_end(hf_tokenizer):
    full = jt.encode(LONG_TEXT)
    assert len(full) == 90
    ids, mask = jt.tokenize(LONG_TEXT)
    assert ids.shape == (1, 32)
    assert ids[0].tolist() == [49406, *full[:30], 49407]
    assert mask[0].tolist() == [1] * 32
    ref_ids, ref_mask = _hf_encode(hf_tokenizer, [LONG_TEXT])
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    # Exactly 30 content tokens fit without truncation; 31 drop the last one.
    words = " ".join(["cat"] * 31)
    assert jt.tokenize(words)[0][0].tolist() == [49406] + [2368] * 30 + [49407]


def test_layout_empty_and_short():
    ids, mask = jt.tokenize("")
    assert ids[0].tolist() == [49406, 49407] + [49407] * 30
    assert mask[0].tolist() == [1, 1] + [0] * 30
    ids, mask = jt.tokenize(["a photo of a cat", "cat"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert mask.sum(axis=1).tolist() == [7, 3]
    assert ids[1, :3].tolist() == [49406, 2368, 49407]
    assert (ids[1, 3:] == jt.PAD_ID).all()


def test_context_length_and_batch_shapes():
    ids, mask = jt.tokenize(("a", "b", "c"), context_length=8)
    assert ids.shape == mask.shape == (3, 8)
    ids, mask = jt.tokenize([])
    assert ids.shape == (0, 32)
    ids, _ = jt.tokenize("a photo of a cat", context_length=4)
    assert ids[0].tolist() == [49406, 320, 1125, 49407]


@pytest.mark.parametrize(
    "text",
    ["a photo of a cat", "yellow school bus", "café crème", "日本語 テキスト", "🐱 🐶", "3 apples , 7 pears", "hello , world !"],
)
def test_detokenize_round_trip(text):
    ids, _ = jt.tokenize(text)
    assert jt.detokenize(ids[0]) == text
    assert jt.detokenize(ids[0].tolist()) == text
    assert jt.detokenize(jt.encode(text)) == text


def test_detokenize_normalises_like_clip():
    ids, _ = jt.tokenize("  Hello,   WORLD!  ")
    assert jt.detokenize(ids[0]) == "hello , world !"
    assert jt.detokenize([]) == ""
    assert jt.detokenize(np.array([49406, 49407, 49407])) == ""


def test_bad_inputs():
    with pytest.raises(TypeError, match="str"):
        jt.tokenize(123)
    with pytest.raises(TypeError, match="int"):
        jt.tokenize(["ok", 5])
    with pytest.raises(TypeError, match="str"):
        jt.encode(b"bytes")
    with pytest.raises(ValueError, match="context_length"):
        jt.tokenize("a", context_length=1)
    with pytest.raises(ValueError, match="1D"):
        jt.detokenize(np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="49408"):
        jt.detokenize([1, 49408])
    with pytest.raises(TypeError, match="integer"):
        jt.detokenize([1.5])
    with pytest.raises(TypeError, match="string"):
        jt.detokenize("cat")


def test_corrupt_vocab_is_rejected(tmp_path, monkeypatch):
    bad = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    data = bytearray(gzip.decompress(VOCAB_GZ.read_bytes()))
    data[1000] ^= 1  # one flipped bit inside the merge list
    bad.write_bytes(gzip.compress(bytes(data)))
    monkeypatch.setenv(jt.VOCAB_ENV, str(bad))
    with pytest.raises(ValueError, match="corrupt") as err:
        jt.ClipTokenizer()
    assert str(bad) in str(err.value)

    bad.write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match=str(bad)):
        jt.ClipTokenizer()

    monkeypatch.setenv(jt.VOCAB_ENV, str(tmp_path / "missing.gz"))
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        jt.ClipTokenizer()


def test_env_override_accepts_equivalent_copy(tmp_path, monkeypatch):
    # A plain-text copy of the same vocabulary passes the content hash check.
    plain = tmp_path / "vocab.txt"
    plain.write_bytes(gzip.decompress(VOCAB_GZ.read_bytes()))
    monkeypatch.setenv(jt.VOCAB_ENV, str(plain))
    tok = jt.ClipTokenizer()
    assert tok.vocab_path == plain
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_content_ids_and_lazy_subpackages():
    """README: `import jalias` then `jalias.search.run_search(...)` and `jalias.content_ids(texts)` work as written
    (in a fresh interpreter, so no earlier test has imported the subpackage)."""
    import subprocess
    import sys

    code = ("import jalias, json; print(json.dumps([callable(jalias.search.run_search),"
            " jalias.content_ids('striped blob'), jalias.content_ids(['a', 'kiwi fruit'])]))")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    ok, one, many = json.loads(out)
    assert ok and one == [jt.encode("striped blob")] and many == [jt.encode("a"), jt.encode("kiwi fruit")]
    ids, mask = jt.tokenize("striped blob")
    assert list(ids[0][1:1 + int(mask[0].sum()) - 2]) == one[0]  # the content between START and END


def test_round_trips_on_the_tokenizers_hard_cases():
    """An alias is usable as a plain prompt only if its text tokenizes back to its ids. The token ids here are
    looked up from the vocabulary by their strings, so each case is the one it names."""
    ids = {s: i for i, s in enumerate(jt.token_strings())}
    kiwi_fruit = jt.encode("kiwi fruit")
    cases = {
        "two whole words": (kiwi_fruit, True),
        # 'hel' + 'lo</w>' reads "hello", which the BPE merges into one token
        "pieces that merge across the join": ([ids["hel"], ids["lo</w>"]], False),
        # a word piece without '</w>' glues onto the next word: "straw" + "berry</w>" -> "strawberry", one token
        "a piece without its end-of-word marker": ([ids["straw"], ids["berry</w>"]], False),
        # the end-of-word marker at the end of every word: the same words as text
        "end-of-word tokens only": ([ids["hello</w>"], ids["world</w>"]], True),
        # byte 0xC3 alone (the first half of a 2-byte UTF-8 character) decodes to U+FFFD: other tokens
        "a partial UTF-8 byte": ([ids["Ã"], ids["cat</w>"]], False),
        "non-ASCII that is a whole word": (jt.encode("café"), True),
    }
    got = jt.round_trips([c[0] for c in cases.values()])
    assert dict(zip(cases, got.tolist())) == {k: v[1] for k, v in cases.items()}
    for (seq, want), ok in zip(cases.values(), got):
        assert (jt.encode(jt.detokenize(seq)) == list(seq)) == want == ok
