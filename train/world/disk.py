"""A knowledge world on disk: write the built-in one, read and validate any world in the schema.

The schema is documented in ``docs/world_schema.md``. A world directory holds
    manifest.json          {"schema": 1, "generator": WorldConfig fields or null, "corpus": {...}, "name": ...}
    corpus.jsonl           pretraining rows: text, context, kind, facts, mentions, recall
    eval/<split>.jsonl     eval examples, one file per split kind (``SPLITS``): prompt, choices, gold, answer, ...
    reference.jsonl        optional: {prompt, answer} rows, the mean ablations' reference set
    drills.jsonl           optional: reading-drill rows (corpus schema, each with a context) for data.fresh_drills

Every reader validates as it goes: a malformed line is a ValueError naming ``file:line`` and the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from pure_reasoner.train.world import text as wt
from pure_reasoner.train.world.generator import World, build_world, pretraining_corpus, world_config
from pure_reasoner.train.world.splits import OPEN_BOOK_SPLITS, SPLITS, reference_pairs, split_examples

SCHEMA_VERSION = 1
MANIFEST, CORPUS, EVAL_DIR = "manifest.json", "corpus.jsonl", "eval"
REFERENCE, DRILLS = "reference.jsonl", "drills.jsonl"
# Built-in span types that name what a fact is about (the rest of the typed spans are values).
MENTION_TYPES = ("name", "city", "company")
CORPUS_KWARGS = ("in_context_fraction", "num_drills", "drill_questions", "epoch")


class _Line:
    """Field checks for one JSON line; every failure names ``file:line`` and the field."""

    def __init__(self, path: Path, lineno: int, row: Any):
        self.where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise ValueError(f"{self.where}: expected a JSON object, got {type(row).__name__}")
        self.row = row

    def fail(self, field: str, why: str) -> None:
        raise ValueError(f"{self.where}: field {field!r} {why}")

    def get(self, field: str, kind: type | tuple[type, ...], default: Any = dataclasses.MISSING) -> Any:
        if field not in self.row or self.row[field] is None:
            if default is dataclasses.MISSING:
                self.fail(field, "is missing")
            return default
        value = self.row[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.fail(field, f"must be {names}, got {json.dumps(value)[:60]}")
        return value

    def span(self, field: str, start: Any, end: Any, length: int) -> tuple[int, int]:
        if not (isinstance(start, int) and isinstance(end, int) and not isinstance(start, bool)
                and not isinstance(end, bool) and 0 <= start < end <= length):
            self.fail(field, f"has span [{start}, {end}] outside the row's {length} characters (0 <= start < end)")
        return start, end


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg})") from err


def _facts(line: _Line, full: str, field: str = "facts") -> list[dict]:
    out = []
    for i, fact in enumerate(line.get(field, list, [])):
        name = f"{field}[{i}]"
        if not isinstance(fact, dict):
            line.fail(name, "must be an object {start, end, subject, attribute, value}")
        start, end = line.span(name, fact.get("start"), fact.get("end"), len(full))
        for key in ("subject", "attribute", "value"):
            if not isinstance(fact.get(key), str) or not fact[key]:
                line.fail(f"{name}.{key}", "must be a non-empty string")
        if full[start:end] != fact["value"]:
            line.fail(f"{name}.value", f"is {fact['value']!r} but the text at [{start}, {end}) is "
                                       f"{full[start:end]!r}")
        out.append({k: fact[k] for k in ("start", "end", "subject", "attribute", "value")})
    return out


def _mentions(line: _Line, full: str) -> list[dict]:
    out = []
    for i, m in enumerate(line.get("mentions", list, [])):
        name = f"mentions[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("entity"), str):
            line.fail(name, "must be an object {start, end, entity}")
        start, end = line.span(name, m.get("start"), m.get("end"), len(full))
        out.append({"start": start, "end": end, "entity": m["entity"]})
    return out


def _recall(line: _Line, full: str, required: bool) -> list[list[int]] | None:
    spans = line.get("recall", list, None)
    if spans is None:
        if required:
            line.fail("recall", "is missing: the recall-token objectives (objective.consult_targets=recall, "
                                "route_tokens=recall, forget_weight) read it on every row ([] for none)")
        return None
    for i, span in enumerate(spans):
        if not isinstance(span, list) or len(span) != 2:
            line.fail(f"recall[{i}]", f"must be [start, end], got {json.dumps(span)[:40]}")
        line.span(f"recall[{i}]", span[0], span[1], len(full))
    return spans


def read_corpus(path: str | Path, recall: bool = False, need_context: bool = False) -> list[dict]:
    """Validated pretraining rows {text, context, kind, facts, mentions, recall} of a ``corpus.jsonl``.

    recall: every row must carry ``recall`` (the recall objectives read it). need_context: every row must
    have a non-empty ``context`` (reading drills).
    """
    path = Path(path)
    rows = []
    for lineno, raw in _json_lines(path):
        line = _Line(path, lineno, raw)
        text = line.get("text", str)
        if not text:
            line.fail("text", "is empty")
        context = line.get("context", str, "")
        if need_context and not context:
            line.fail("context", "is missing or empty (a reading drill supplies its facts in context)")
        full = context + text
        rows.append({"text": text, "context": context, "kind": line.get("kind", str, ""),
                     "facts": _facts(line, full), "mentions": _mentions(line, full),
                     "recall": _recall(line, full, recall)})
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def read_split(path: str | Path, split: str) -> list[dict]:
    """Validated eval examples of one split kind (``SPLITS``), in the dict form ``train.evaluation.evaluate`` scores."""
    if split not in SPLITS:
        raise ValueError(f"unknown split kind {split!r} ({path}); choose from {SPLITS}")
    path = Path(path)
    out = []
    for lineno, raw in _json_lines(path):
        line = _Line(path, lineno, raw)
        if line.get("split", str, split) != split:
            line.fail("split", f"is {raw['split']!r} in the file of split {split!r}")
        prompt, context = line.get("prompt", str), line.get("context", str, "")
        if not prompt:
            line.fail("prompt", "is empty")
        if split in OPEN_BOOK_SPLITS and not context:
            line.fail("context", f"is missing or empty: a {split} example states its facts in context")
        if not prompt.startswith(context):
            line.fail("prompt", "does not start with the example's context")
        choices = line.get("choices", list)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices) or len(set(choices)) < len(choices):
            line.fail("choices", f"must be >= 2 distinct non-empty strings, got {json.dumps(choices)[:80]}")
        gold = line.get("gold", int)
        if not 0 <= gold < len(choices):
            line.fail("gold", f"is {gold}, not an index into the {len(choices)} choices")
        answer = line.get("answer", str)
        if answer != choices[gold]:
            line.fail("answer", f"is {answer!r} but choices[gold={gold}] is {choices[gold]!r}")
        memorised = line.get("memorised", str, "")
        if split == "counterfactual" and (not memorised or memorised == answer):
            line.fail("memorised", "must be the trained value, non-empty and other than the answer (counterfactual)")
        full = prompt + wt.continuation(answer)
        out.append({"id": line.get("id", str, f"{split}-{lineno}"), "split": split, "prompt": prompt,
                    "context": context, "question": line.get("question", str, ""), "choices": choices, "gold": gold,
                    "answer": answer, "memorised": memorised, "person": line.get("person", str, ""),
                    "attribute": line.get("attribute", str, ""), "facts": _facts(line, full),
                    "mentions": _mentions(line, full)})
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def read_reference(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs of a ``reference.jsonl`` ({prompt, answer} rows)."""
    path = Path(path)
    pairs = []
    for lineno, raw in _json_lines(path):
        line = _Line(path, lineno, raw)
        pairs.append((line.get("prompt", str), wt.continuation(line.get("answer", str))))
    if len(pairs) < 2:
        raise ValueError(f"{path} holds {len(pairs)} rows; the mean-ablation reference set needs >= 2")
    return pairs


@dataclass(frozen=True)
class WorldDir:
    """A world directory, its manifest read and checked; files are read (and validated) when asked for.

    generated: the built-in World the manifest's ``generator`` rebuilds (None for a world without one): fresh
    reading drills and the knowledge-bits estimate need it.
    """

    path: Path
    manifest: dict
    generated: World | None

    @property
    def splits(self) -> tuple[str, ...]:
        """The split kinds this world has a file for, in ``SPLITS`` order."""
        return tuple(s for s in SPLITS if (self.path / EVAL_DIR / f"{s}.jsonl").is_file())

    def examples(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise ValueError(f"world {self.path} has no split {split!r} ({EVAL_DIR}/{split}.jsonl); it has "
                             f"{list(self.splits)}")
        return read_split(self.path / EVAL_DIR / f"{split}.jsonl", split)

    def corpus(self, recall: bool = False) -> list[dict]:
        return read_corpus(self.path / CORPUS, recall=recall)

    def reference_pairs(self) -> list[tuple[str, str]]:
        path = self.path / REFERENCE
        if not path.is_file():
            raise ValueError(f"the mean ablations need a reference set: world {self.path} has no {REFERENCE} "
                             "({prompt, answer} rows; see docs/world_schema.md)")
        return read_reference(path)

    @property
    def drill_questions(self) -> int:
        return int(self.manifest.get("corpus", {}).get("drill_questions", 1))

    def describe(self) -> dict:
        return {"path": str(self.path), "manifest": self.manifest}


def load_world(path: str | Path) -> WorldDir:
    """Open a world directory (``manifest.json`` checked now, the other files when read)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{path} is not a world directory: no {MANIFEST} (see docs/world_schema.md)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path}:{err.lineno}: malformed JSON ({err.msg})") from err
    line = _Line(manifest_path, 1, manifest)
    if line.get("schema", int) != SCHEMA_VERSION:
        line.fail("schema", f"is {manifest['schema']}; this reader knows schema {SCHEMA_VERSION}")
    generator = line.get("generator", dict, None)
    corpus = line.get("corpus", dict, {})
    questions = corpus.get("drill_questions", 1)
    if not isinstance(questions, int) or isinstance(questions, bool) or questions < 1:
        line.fail("corpus.drill_questions", f"must be an int >= 1, got {corpus['drill_questions']!r}")
    try:
        generated = build_world(world_config(**generator)) if generator is not None else None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{manifest_path}: field 'generator': {err}") from err
    return WorldDir(path, manifest, generated)


def corpus_dataset(path: str | Path, recall: bool = False) -> datasets.Dataset:
    """The corpus of a world directory as columns text, context (and recall), as ``train.data`` reads a
    generator's rows."""
    rows = load_world(path).corpus(recall=recall)
    columns = {"text": [r["text"] for r in rows], "context": [r["context"] for r in rows]}
    if recall:
        columns["recall"] = [r["recall"] for r in rows]
    return datasets.Dataset.from_dict(columns)


def corpus_row(row: dict) -> dict:
    """A built-in training row ({text, context, kind, spans, recall}) in the on-disk schema."""
    full = row["context"] + row["text"]
    return {"text": row["text"], "context": row["context"], "kind": row["kind"], **_split_spans(row["spans"], full),
            "recall": row["recall"]}


def _split_spans(spans: list[dict], full: str) -> dict:
    """Built-in typed spans -> ``facts`` (values: subject, attribute, value) and ``mentions`` (names)."""
    facts = [{"start": s["start"], "end": s["end"], "subject": s["entity"], "attribute": s["type"],
              "value": full[s["start"] : s["end"]]} for s in spans if s["type"] not in MENTION_TYPES]
    mentions = [{"start": s["start"], "end": s["end"], "entity": s["entity"]} for s in spans
                if s["type"] in MENTION_TYPES]
    return {"facts": facts, "mentions": mentions}


def example_row(ex: dict) -> dict:
    """A built-in eval example in the on-disk schema."""
    keys = ("id", "split", "prompt", "context", "question", "choices", "gold", "answer", "memorised", "person",
            "attribute")
    full = ex["prompt"] + wt.continuation(ex["answer"])
    return {**{k: ex[k] for k in keys}, **_split_spans(ex["spans"], full)}


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_world(out: str | Path, world: World, *, in_context_fraction: float = 0.5, num_drills: int | None = None,
                drill_questions: int = 1, epoch: int = 0,
                reference: Callable[[World], list[tuple[str, str]]] = reference_pairs) -> Path:
    """Write the built-in ``world`` in the schema: manifest, corpus (``pretraining_corpus`` with these
    arguments), every eval split and the mean ablations' reference set (``reference(world)``)."""
    out = Path(out)
    corpus_kwargs = {"in_context_fraction": in_context_fraction, "num_drills": num_drills,
                     "drill_questions": drill_questions, "epoch": epoch}
    corpus = pretraining_corpus(world, **corpus_kwargs)
    _write_lines(out / CORPUS, [corpus_row(r) for r in corpus])
    for split in SPLITS:
        _write_lines(out / EVAL_DIR / f"{split}.jsonl", [example_row(ex) for ex in split_examples(world, split)])
    _write_lines(out / REFERENCE, [{"prompt": p, "answer": c[1:-1]} for p, c in reference(world)])
    manifest = {"schema": SCHEMA_VERSION, "name": f"built-in world, seed {world.cfg.seed}",
                "generator": dataclasses.asdict(world.cfg), "corpus": corpus_kwargs}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
