"""CLIP's BPE vocabulary, shipped in the package (``assets/bpe_simple_vocab_16e6.txt.gz``, OpenAI's file).

Every CLIP tokenizer dts-util writes (the built-in model's, single-file checkpoints' configs, FLUX's
CLIP-L) is built from it, offline. A module of its own: the model store, the config folders and the
built-in model all need it, and none of them should import another for it.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table used by BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """The real CLIP tokenizer's (vocab, merges), derived from OpenAI's BPE file.

    Same construction as CLIP's SimpleTokenizer, so the ids match HF's
    openai/clip-vit-large-patch14 vocab.json: 256 bytes, 256 end-of-word bytes,
    48,894 merges, then the two special tokens (49,408 in all).
    """
    blob = resources.files("dts_util.models").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(blob).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges
