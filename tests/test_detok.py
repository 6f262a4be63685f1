"""Streaming text never shows half a character or a stop string."""

from __future__ import annotations

import re

import pytest

from bot.engine.detok import REPLACEMENT, IncrementalDecoder, StopFilter
from bot.engine.transformers import HFPromptTokenizer

JAPANESE = "大規模言語モデル（LLM）とは、自然言語処理の分野で用いられるモデルです。1. 柔軟性：豊かな表現力"


def stream_pieces(tok: HFPromptTokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tok.decode)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return [p for p in pieces if p]


@pytest.mark.parametrize("fixture", ["llama_tok", "embedded_tok"])
def test_japanese_streams_whole_characters(fixture: str, request: pytest.FixtureRequest) -> None:
    tok: HFPromptTokenizer = request.getfixturevalue(fixture)
    ids = tok.encode_text(JAPANESE)
    # The case the seed hit: single characters spelled by several tokens.
    assert len(ids) > len(JAPANESE) // 2
    naive = [tok.decode([i]) for i in ids]
    assert any(REPLACEMENT in p for p in naive), "this tokenizer never splits a character"
    pieces = stream_pieces(tok, ids)
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_english_spacing_survives_streaming(llama_tok: HFPromptTokenizer) -> None:
    text = "The capital of France is Paris. What is the capital of France?"
    assert "".join(stream_pieces(llama_tok, llama_tok.encode_text(text))) == text


def test_cut_mid_character_holds_the_bytes_back(llama_tok: HFPromptTokenizer) -> None:
    ids = llama_tok.encode_text("柔軟性")
    decoder = IncrementalDecoder(llama_tok.decode)
    shown = "".join(decoder.push(i) for i in ids[:-1])  # the reply cut inside the last character
    assert REPLACEMENT not in shown and shown.endswith("軟")
    # At the very end, invalid bytes the model really produced are shown, not dropped.
    tail = decoder.flush()
    assert tail and set(tail) == {REPLACEMENT}


def feed(stop: StopFilter, pieces: list[str]) -> str:
    out = "".join(stop.push(p) for p in pieces)
    return out + stop.flush()


@pytest.mark.parametrize(
    "pieces, expected",
    [
        (["The capital is Paris.", " USER: What about Italy?"], "The capital is Paris."),
        (["Paris. U", "S", "ER", ": next"], "Paris."),
        (["Paris.\n", "USER:"], "Paris."),
        (["USER: hello"], ""),
        (["A MYUSER: is not a turn"], "A MYUSER: is not a turn"),
        (["Paris. US", "A is a country"], "Paris. USA is a country"),
        (["done </s> more"], "done"),
        (["The answer is 8</", "s> USER: next"], "The answer is 8"),
    ],
)
def test_stop_strings_are_never_shown(pieces: list[str], expected: str) -> None:
    stop = StopFilter(["USER:", "</s>"])
    shown = [stop.push(p) for p in pieces]
    assert "".join(shown) + stop.flush() == expected
    assert not any(re.search(r"(^|\s)US(ER?:?)?$|(^|\s)USER:", s) for s in shown)
