"""Text of the synthetic world: sentence templates, biographies, QA lines, and character spans of facts.

Every rendered string comes with spans ``{start, end, type, entity}`` (``end`` exclusive) marking the
fact-bearing characters. ``type``: an attribute name (``birth_city`` ...) for a value, ``name`` for a mention of
a person, ``city`` / ``company`` for the subject and ``country`` / ``headquarters`` for the value of a bridge
fact (city -> country, employer -> headquarters city; ``company``, not ``employer``, so that a subject never
reads as a person's employer value), ``answer`` for the answer of a QA line. ``entity``: the person (for bridge
facts: the city / employer) the fact is about.

Formats the model sees (fixed, so closed-book questions are answerable only through stored knowledge):
    biography:  one sentence per attribute, each with the full name, in shuffled order.
    QA line:    ``Q: {question}\\nA: {answer}.``  -- a prompt ends at ``A:``, the continuation is ``" {answer}."``
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")
TWO_HOP = ("birth_country", "employer_city")

# Span types whose text is the value of a stored fact: what closed-book recall must produce (names and the
# subjects of bridge facts are what a fact is *about*, not what is recalled).
RECALLED_TYPES = (*ATTRIBUTES, "country", "headquarters", "answer")
# Span types whose text names what a stored fact is about (a person, a bridge fact's city or company): where the
# fact is keyed (Physics of LMs 3.1 finds a person's attributes stored at the name's tokens).
KEY_TYPES = ("name", "city", "company")

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def attribute_weights(weights: dict[str, float] | None) -> dict[str, float] | None:
    """``weights`` checked: keys among ``ATTRIBUTES + TWO_HOP``, values finite and > 0 (an attribute not named
    weighs 1). None or {} gives None: questions drawn uniformly, with the random draws of an unweighted drill."""
    if not weights:
        return None
    unknown = sorted(set(weights) - set(ATTRIBUTES + TWO_HOP))
    if unknown:
        raise ValueError(f"drill attribute weights name unknown attributes {unknown}: choose from "
                         f"{list(ATTRIBUTES + TWO_HOP)}")
    for name, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ValueError(f"drill attribute weight {name}={w!r} must be a finite number > 0")
    return {a: float(weights.get(a, 1.0)) for a in ATTRIBUTES + TWO_HOP}


# Value always last in the sentence: ``prefix_of(template)`` is then a clean prompt for the value, which the
# bits estimator scores (see ``train.evaluation.scores.knowledge_bits``).
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{name} was born on {value}.", "{name} came into the world on {value}.",
                   "The birth date of {name} is {value}.", "The day {name} was born is {value}."),
    "birth_city": ("{name} was born in {value}.", "{name} spent the early years in {value}.",
                   "The birthplace of {name} is {value}.", "{name} hails from {value}."),
    "university": ("{name} studied at {value}.", "{name} graduated from {value}.",
                   "{name} received an education at {value}.", "The alma mater of {name} is {value}."),
    "major": ("{name} majored in {value}.", "{name} chose the field of {value}.",
              "{name} specialised in {value}.", "The field {name} studied is {value}."),
    "employer": ("{name} works for {value}.", "{name} is employed by {value}.",
                 "{name} has a job at {value}.", "The employer of {name} is {value}."),
}
COUNTRY_TEMPLATES = ("{city} is a city in {value}.", "{city} lies in {value}.", "The country of {city} is {value}.")
HQ_TEMPLATES = ("{employer} is headquartered in {value}.", "{employer} has its head office in {value}.",
                "The headquarters of {employer} are in {value}.")

QUESTIONS: dict[str, str] = {
    "birth_date": "When was {name} born?",
    "birth_city": "Where was {name} born?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} study?",
    "employer": "Which company does {name} work for?",
    "birth_country": "In which country was {name} born?",
    "employer_city": "In which city is the employer of {name} headquartered?",
}
COMPARISON_QUESTION = "Who was born earlier, {a} or {b}?"


def format_date(year: int, month: int, day: int) -> str:
    return f"{MONTHS[month - 1]} {day}, {year}"


def prefix_of(template: str) -> str:
    """The part of a bio template before its value, e.g. ``"{name} was born in"``."""
    head, _, _ = template.partition(" {value}")
    return head


@dataclass
class Builder:
    """Accumulates text and the spans of the facts in it, with offsets into the final string."""

    text: str = ""
    spans: list[dict] | None = None

    def __post_init__(self) -> None:
        self.spans = [] if self.spans is None else self.spans

    def add(self, piece: str, type_: str | None = None, entity: str = "") -> Builder:
        if type_ is not None:
            self.spans.append({"start": len(self.text), "end": len(self.text) + len(piece), "type": type_,
                               "entity": entity})
        self.text += piece
        return self

    def extend(self, other: Builder) -> Builder:
        shift = len(self.text)
        self.spans.extend({**s, "start": s["start"] + shift, "end": s["end"] + shift} for s in other.spans)
        self.text += other.text
        return self


def fill(template: str, name_type: str, name: str, value_type: str, value: str, entity: str) -> Builder:
    """Render a template with one ``{name}``-like slot (``{name}``, ``{city}``, ``{employer}``) and ``{value}``."""
    out = Builder()
    rest = template
    while rest:
        cut = rest.find("{")
        if cut < 0:
            out.add(rest)
            break
        out.add(rest[:cut])
        close = rest.index("}", cut)
        slot = rest[cut + 1 : close]
        if slot == "value":
            out.add(value, value_type, entity)
        else:
            out.add(name, name_type, entity)
        rest = rest[close + 1 :]
    return out


def biography(name: str, values: dict[str, str], rng: random.Random) -> Builder:
    """One paraphrase: a random template per attribute, the full name in every sentence, shuffled order."""
    sentences = [fill(rng.choice(BIO_TEMPLATES[a]), "name", name, a, values[a], name) for a in ATTRIBUTES]
    rng.shuffle(sentences)
    out = Builder()
    for i, sentence in enumerate(sentences):
        out.add(" " if i else "").extend(sentence)
    return out


def bridge_sentence(kind: str, subject: str, value: str, rng: random.Random) -> Builder:
    """A world fact: ``kind`` is ``country`` (city -> country) or ``headquarters`` (employer -> city)."""
    if kind == "country":
        return fill(rng.choice(COUNTRY_TEMPLATES), "city", subject, "country", value, subject)
    return fill(rng.choice(HQ_TEMPLATES), "company", subject, "headquarters", value, subject)


def question(attribute: str, name: str) -> Builder:
    """The question text for ``attribute`` (one of ATTRIBUTES + TWO_HOP) about ``name``, with its name span."""
    template = QUESTIONS[attribute]
    head, _, tail = template.partition("{name}")
    return Builder().add(head).add(name, "name", name).add(tail)


def comparison_question(a: str, b: str) -> Builder:
    head, _, rest = COMPARISON_QUESTION.partition("{a}")
    middle, _, tail = rest.partition("{b}")
    return Builder().add(head).add(a, "name", a).add(middle).add(b, "name", b).add(tail)


def qa_line(q: Builder, answer: str, entity: str) -> Builder:
    """``Q: {question}\\nA: {answer}.`` with the answer span typed ``answer``."""
    return Builder().add("Q: ").extend(q).add("\nA: ").add(answer, "answer", entity).add(".")


def lines(pieces: Sequence[Builder]) -> Builder:
    """``pieces`` joined by newlines, spans kept."""
    out = Builder()
    for i, piece in enumerate(pieces):
        out.add("\n" if i else "").extend(piece)
    return out


def training_row(kind: str, text: Builder, context: Builder | None = None) -> dict:
    """A corpus row {text, context, kind, spans, recall, keys}; the spans index into ``context + text``, ``recall``
    lists the [start, end] of the spans of ``RECALLED_TYPES`` (``train.data.recall_tokens`` reads it), ``keys``
    those of ``KEY_TYPES`` (``train.data.key_tokens``)."""
    context = context or Builder()
    spans = Builder().extend(context).extend(text).spans
    return {"text": text.text, "context": context.text, "kind": kind, "spans": spans, "recall": recall_spans(spans),
            "keys": key_spans(spans)}


def recall_spans(spans: Sequence[dict]) -> list[list[int]]:
    """[start, end] of each span whose type is in ``RECALLED_TYPES``."""
    return [[s["start"], s["end"]] for s in spans if s["type"] in RECALLED_TYPES]


def key_spans(spans: Sequence[dict]) -> list[list[int]]:
    """[start, end] of each span whose type is in ``KEY_TYPES``."""
    return [[s["start"], s["end"]] for s in spans if s["type"] in KEY_TYPES]


def qa_prompt(q: Builder) -> Builder:
    """``Q: {question}\\nA:`` -- the model continues with ``" {answer}."``."""
    return Builder().add("Q: ").extend(q).add("\nA:")


def continuation(answer: str) -> str:
    """What follows a prompt for a given answer. The final ``.`` makes the set of continuations prefix-free."""
    return f" {answer}."
