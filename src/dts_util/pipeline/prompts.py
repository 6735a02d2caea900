"""Prompts as A1111 reads them: emphasis weights, 75-token chunks, and ``<lora:name:weight>`` tags.

CLIP reads 77 tokens (a start token, 75 of text, an end token). Longer prompts are
split into 75-token chunks, each encoded on its own between start and end tokens,
and the chunks' hidden states are concatenated: 77 x chunks tokens of conditioning.
Emphasis multiplies each token's hidden state by its weight, then rescales the
chunk so its mean is unchanged, as A1111 does:

- ``(words)`` x1.1, ``((words))`` x1.21, ``[words]`` /1.1,
- ``(words:1.3)`` sets the weight, ``\\(`` and ``\\)`` are literal brackets,
- ``BREAK`` ends the current chunk early.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dts_util.boundary import TOKENS_PER_CHUNK

TEXT_TOKENS_PER_CHUNK = TOKENS_PER_CHUNK - 2
# Cross-attention cost grows with every chunk; 8 chunks are 600 tokens, far more than real prompts use.
# Text past that is not read (as CLIP's own 77-token limit cuts a single chunk), and info says so.
MAX_CHUNKS = 8
ROUND_WEIGHT, SQUARE_WEIGHT = 1.1, 1 / 1.1
_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|.", re.S)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([+-]?(?:\d+\.?\d*|\.\d+)))?>")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``text`` as (fragment, weight) pairs; ``("BREAK", -1)`` marks a chunk break."""
    parts: list[tuple[str, float]] = []
    for index, segment in enumerate(_BREAK.split(text)):
        if index:
            parts.append(("BREAK", -1.0))
        parts += _parse_segment(segment)
    return parts or [("", 1.0)]


def _parse_segment(text: str) -> list[tuple[str, float]]:
    fragments: list[list] = []
    round_open: list[int] = []  # indices into fragments where each open bracket started
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            fragments.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_WEIGHT)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_WEIGHT)
        else:
            fragments.append([token, 1.0])
    for start in round_open:  # unclosed brackets still count, as in A1111
        multiply(start, ROUND_WEIGHT)
    for start in square_open:
        multiply(start, SQUARE_WEIGHT)
    merged: list[tuple[str, float]] = []
    for fragment, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    return merged


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:name:weight>`` tags (weight 1 when left out), and the tags."""
    tags = [LoraTag(m.group(1).strip(), float(m.group(2)) if m.group(2) else 1.0) for m in _LORA_TAG.finditer(prompt)]
    return _LORA_TAG.sub("", prompt), tags


@dataclass
class TokenChunks:
    """A prompt tokenized into chunks of ``TOKENS_PER_CHUNK`` ids with a weight per id."""

    ids: list[list[int]]
    weights: list[list[float]]
    token_count: int  # text tokens, without start/end/padding
    dropped: int = 0  # text tokens past MAX_CHUNKS chunks, which are not read


def tokenize_chunks(tokenizer, text: str, padding_id: int | None = None) -> TokenChunks:
    """Tokenize with emphasis into 75-token chunks, each wrapped in start/end tokens and padded to 77."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if padding_id is None else padding_id
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    count = 0
    for fragment, weight in parse_emphasis(text):
        if weight == -1.0:  # BREAK
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        tokens = tokenizer(fragment, add_special_tokens=False, truncation=False).input_ids
        count += len(tokens)
        for token in tokens:
            if len(ids) == TEXT_TOKENS_PER_CHUNK:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    dropped = sum(len(chunk_ids) for chunk_ids, _ in chunks[MAX_CHUNKS:])
    chunks = chunks[:MAX_CHUNKS]
    padded_ids, padded_weights = [], []
    for chunk_ids, chunk_weights in chunks:
        fill = TEXT_TOKENS_PER_CHUNK - len(chunk_ids)
        padded_ids.append([start, *chunk_ids, end, *([pad] * fill)])
        padded_weights.append([1.0, *chunk_weights, 1.0, *([1.0] * fill)])
    return TokenChunks(padded_ids, padded_weights, count, dropped)


def pad_to_chunks(chunks: TokenChunks, count: int, empty: TokenChunks) -> TokenChunks:
    """Append empty chunks so a prompt and its negative have the same length (CFG batches them)."""
    missing = count - len(chunks.ids)
    return TokenChunks(chunks.ids + empty.ids[:1] * missing, chunks.weights + empty.weights[:1] * missing,
                       chunks.token_count, chunks.dropped)
