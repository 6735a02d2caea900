"""A1111 prompt syntax: emphasis, BREAK, LoRA tags, and 75-token chunks."""

from __future__ import annotations

import pytest

from dts_util.pipeline.prompts import MAX_CHUNKS, extract_lora_tags, parse_emphasis, tokenize_chunks


@pytest.mark.parametrize("text,expected", [
    ("a (red:1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
    ("((big))", [("big", pytest.approx(1.21))]),
    ("[small]", [("small", pytest.approx(1 / 1.1))]),
    ("(a [b]:1.5)", [("a ", 1.5), ("b", pytest.approx(1.5 / 1.1))]),
    (r"\(literal\) \[x\]", [("(literal) [x]", 1.0)]),
    ("(unclosed", [("unclosed", pytest.approx(1.1))]),
    ("one BREAK two", [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("", [("", 1.0)]),
])
def test_emphasis(text, expected) -> None:
    assert parse_emphasis(text) == expected


def test_lora_tags_are_extracted() -> None:
    prompt, tags = extract_lora_tags("castle <lora:style:0.7>, <lora:detail> at dusk")
    assert prompt == "castle ,  at dusk"  # the tags go; the text around them stays as it was
    assert [(t.name, t.weight) for t in tags] == [("style", 0.7), ("detail", 1.0)]


@pytest.fixture(scope="module")
def tokenizer(model_store):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_store.root / "builtin-tiny-sd", subfolder="tokenizer")


def test_chunks_of_75_tokens(tokenizer) -> None:
    one = tokenize_chunks(tokenizer, "a photo of a cat")
    assert one.ids == [[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70] and one.token_count == 5
    long = tokenize_chunks(tokenizer, "red " * 100)
    assert [len(c) for c in long.ids] == [77, 77] and long.token_count == 100
    assert long.ids[0][0] == 49406 and long.ids[0][76] == 49407 and long.ids[1][26] == 49407
    weighted = tokenize_chunks(tokenizer, "a (cat:1.5)")
    assert weighted.weights[0][:4] == [1.0, 1.0, 1.5, 1.0]
    assert len(tokenize_chunks(tokenizer, "x BREAK y").ids) == 2


def test_text_past_the_last_chunk_is_counted_as_not_read(tokenizer) -> None:
    chunks = tokenize_chunks(tokenizer, "red " * (75 * MAX_CHUNKS + 10))
    assert len(chunks.ids) == MAX_CHUNKS and chunks.dropped == 10
