"""Splitting long text for speech synthesis at sentence boundaries, so a paragraph is neither refused nor cut."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?…;。！？；])\s+|(?<=[。！？；])|\n+")
_CLAUSE_END = re.compile(r"(?<=[,:、，：])\s*")


def _pack(pieces: list[str], max_chars: int, joiner: str) -> list[str]:
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current}{joiner}{piece}" if current else piece
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            chunks.append(current)
        current = piece
    if current:
        chunks.append(current)
    return chunks


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """A sentence longer than max_chars: split at clause marks, then at spaces, then anywhere."""
    if len(sentence) <= max_chars:
        return [sentence]
    for pattern, joiner in ((_CLAUSE_END, " "), (re.compile(r"\s+"), " ")):
        parts = [part for part in pattern.split(sentence) if part]
        if len(parts) > 1:
            return [chunk for part in _pack(parts, max_chars, joiner) for chunk in _split_long(part, max_chars)]
    return [sentence[start : start + max_chars] for start in range(0, len(sentence), max_chars)]


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Each sentence its own piece, in order, none empty; only a sentence over max_chars is cut further. For
    streaming: the first sentence is heard as soon as it is spoken."""
    sentences = [sentence.strip() for sentence in _SENTENCE_END.split(text.strip())]
    return [piece for sentence in sentences if sentence for piece in _split_long(sentence, max_chars)]


def split_text(text: str, max_chars: int) -> list[str]:
    """Chunks of at most max_chars, cut at sentence ends where possible, in order, none empty."""
    return _pack(split_sentences(text, max_chars), max_chars, " ")
