"""jalias: search SAM3 prompt-token "aliases" with a JAX/Flax engine."""

from jalias.tokenizer import detokenize, tokenize

__all__ = ["tokenize", "detokenize"]
