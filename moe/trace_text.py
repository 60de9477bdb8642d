"""Text in, tokens with character spans out, for the knowledge trace; and the annotated JSONL reader.

A checkpoint directory that holds ``tokenizer.json`` (a HuggingFace ``tokenizers`` file) is tokenized
with it; otherwise text is read as UTF-8 bytes (ids 0..255), one token per byte.

Every token carries ``label``: the text to display for it. Labels are made visible before they reach
any view: control characters become ``\\xNN``, line/paragraph separators and bidirectional overrides
``\\uNNNN`` (so untrusted text cannot move the terminal cursor, break lines unseen or reorder what is
shown); a newline shows as ``↵`` then breaks.
Escaping for HTML is the renderer's job.

Annotated JSONL (``read_jsonl``), one document per line:

    {"text": "Zorblat Quen was born in Vesk.",
     "facts": [{"start": 0, "end": 12, "type": "name", "entity": "Zorblat Quen"},
               {"start": 25, "end": 29, "type": "birth_city", "entity": "Zorblat Quen"}]}

``start``/``end`` are Python character offsets into ``text`` (end exclusive); ``type`` is the kind of
fact (an attribute name); ``entity`` is who or what it is about. ``facts`` is optional. A token is
fact-bearing when its character span overlaps a fact span.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer

TOKENIZER = "tokenizer.json"
BYTE_VOCAB = 256
# Bidirectional embeddings, overrides and isolates (category Cf): they reorder displayed text.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class Token(NamedTuple):
    """id: token id; label: what to display (never empty); start, end: character span in the text;
    placeholder: the label is not source text (a byte inside a character, a special token)."""

    id: int
    label: str
    start: int
    end: int
    placeholder: bool = False


class Fact(NamedTuple):
    """A fact mention: characters [start, end) of the text state a ``type`` fact about ``entity``."""

    start: int
    end: int
    type: str
    entity: str


def visible(text: str) -> str:
    """``text`` with control characters and bidi overrides escaped; a newline shows as ``↵``."""
    out = []
    for char in text:
        if char == "\n":
            out.append("↵\n")
        elif char == "\t":
            out.append(char)
        elif unicodedata.category(char) in ("Cc", "Zl", "Zp") or char in _BIDI:
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


class TextCodec:
    """Turns text into ``Token``s with a HuggingFace tokenizer, or bytes when there is none.

    description: one line saying which (shown in every view).
    """

    def __init__(self, tokenizer: Tokenizer | None, description: str):
        self.tokenizer = tokenizer
        self.description = description

    @classmethod
    def for_model(cls, directory: str | Path | None, vocab_size: int) -> TextCodec:
        """The codec for a checkpoint directory (None: a random model): its tokenizer.json, or bytes.

        Raises ValueError when the tokenizer cannot be read or its ids do not fit ``vocab_size``.
        """
        path = Path(directory) / TOKENIZER if directory is not None else None
        if path is not None and path.is_file():
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as err:  # tokenizers raises its own Exception subclass
                raise ValueError(f"{path} is not a readable tokenizer file: {err}") from err
            if tokenizer.get_vocab_size() > vocab_size:
                raise ValueError(
                    f"{path} has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is {vocab_size}"
                )
            return cls(tokenizer, f"tokenizer: {path}")
        if vocab_size < BYTE_VOCAB:
            raise ValueError(
                f"no {TOKENIZER} found, and byte-level tokens need vocab_size >= {BYTE_VOCAB}; model has {vocab_size}"
            )
        where = f"no {TOKENIZER} in {directory}" if directory is not None else "random model"
        return cls(None, f"byte-level tokens: UTF-8 bytes as ids 0..255 ({where})")

    def encode(self, text: str) -> list[Token]:
        """Tokens of ``text``; raises ValueError if it yields none."""
        tokens = _byte_tokens(text) if self.tokenizer is None else self._hf_tokens(text)
        if not tokens:
            raise ValueError("text is empty: nothing to trace")
        return tokens

    def _hf_tokens(self, text: str) -> list[Token]:
        encoding = self.tokenizer.encode(text)
        starts = [start for start, _ in encoding.offsets]
        tokens = []
        for i, (token_id, (start, end)) in enumerate(zip(encoding.ids, encoding.offsets, strict=True)):
            # A token displays the text up to the next token's start, so the labels read as the text
            # (whitespace that offsets trim included). Tokens sharing a span (a character split
            # across byte tokens, an added special token) show their vocabulary entry instead.
            stop = starts[i + 1] if i + 1 < len(starts) else len(text)
            own = text[start:stop] if stop > start else ""
            label = own or self.tokenizer.id_to_token(token_id) or f"<{token_id}>"
            tokens.append(Token(token_id, visible(label), start, end, placeholder=not own))
        return tokens


def _byte_tokens(text: str) -> list[Token]:
    """One token per UTF-8 byte; a character's first byte shows it, further bytes show as ``\\xNN``."""
    tokens = []
    for position, char in enumerate(text):
        for j, byte in enumerate(char.encode("utf-8")):
            label = visible(char) if j == 0 else f"\\x{byte:02x}"
            tokens.append(Token(byte, label, position, position + 1, placeholder=j > 0))
    return tokens


def parse_facts(raw, text: str, where: str) -> list[Fact]:
    """Validate a list of {"start", "end", "type", "entity"} spans against ``text``; ``where`` names
    the source in errors."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"{where}: facts must be a list, got {type(raw).__name__}")
    facts = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"start", "end", "type", "entity"}:
            raise ValueError(f"{where}: fact {i} must have exactly start, end, type, entity; got {item!r}")
        start, end = item["start"], item["end"]
        if not all(type(v) is int for v in (start, end)) or not 0 <= start < end <= len(text):
            raise ValueError(f"{where}: fact {i} span [{start!r}, {end!r}) is not inside the text (len {len(text)})")
        if not isinstance(item["type"], str) or not isinstance(item["entity"], str):
            raise ValueError(f"{where}: fact {i} type and entity must be strings, got {item!r}")
        facts.append(Fact(start, end, item["type"], item["entity"]))
    return facts


def read_jsonl(
    path: str | Path, text_field: str = "text", facts_field: str = "facts"
) -> list[tuple[str, list[Fact]]]:
    """Read annotated documents (format in the module docstring). Raises ValueError naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{where}: needs a string field {text_field!r}")
        text = record[text_field]
        if not text:
            raise ValueError(f"{where}: field {text_field!r} is empty")
        docs.append((text, parse_facts(record.get(facts_field), text, where)))
    if not docs:
        raise ValueError(f"{path} holds no documents")
    return docs
