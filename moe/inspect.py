"""Show which knowledge experts each token consults: ``python -m pure_reasoner.moe.inspect``.

    python -m pure_reasoner.moe.inspect --checkpoint runs/x/export --text "Zorblat Quen was born in Vesk."
    python -m pure_reasoner.moe.inspect --random tiny --jsonl split.jsonl --html trace.html --json trace.json

Model: ``--checkpoint DIR`` (``config.json`` + ``model.safetensors``, loaded without unpickling; its
``tokenizer.json`` when present, else UTF-8 bytes) or ``--random PRESET`` (random weights; the consult
controller is first settled on the input so the consult rate sits near its target). Input:
``--text`` or ``--jsonl`` (a ``text`` field per line and optional fact spans, see ``moe.trace_text``;
a ``datasets`` split written with ``Dataset.to_json`` reads as is). Output: a terminal view (tokens
coloured by the number of layers in which they consulted knowledge, consult rates fact vs other,
the experts facts reach most), ``--html`` (a self-contained page) and ``--json`` (the raw trace).

Bad input (missing checkpoint, incompatible config or tokenizer, empty text, unreadable JSONL, an
unwritable output) exits with status 1 and a message naming it, and writes no file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pure_reasoner.moe.checkpoint import atomic_write, load_pretrained
from pure_reasoner.moe.model import PureReasonerLM
from pure_reasoner.moe.presets import PRESET_NAMES, preset
from pure_reasoner.moe.trace_html import render_html
from pure_reasoner.moe.trace_report import (
    TracedDoc,
    describe,
    encode_all,
    expert_table,
    rate_table,
    shade,
    summarize,
    trace_documents,
    trace_record,
)
from pure_reasoner.moe.trace_text import TextCodec, Token, read_jsonl


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.moe.inspect", description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="exported model directory (config.json + model.safetensors)")
    model.add_argument("--random", choices=PRESET_NAMES[:3], help="a randomly initialised model of this preset")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one text to trace")
    source.add_argument("--jsonl", type=Path, help="documents, one JSON object per line, optional fact spans")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--facts-field", default="facts", help="JSONL field holding fact spans (default: facts)")
    parser.add_argument("--max-docs", type=int, default=None, help="trace only the first N JSONL documents")
    parser.add_argument("--truncate", action="store_true", help="cut documents longer than model.max_seq_len")
    parser.add_argument("--html", type=Path, help="write the self-contained HTML view here")
    parser.add_argument("--json", type=Path, help="write the raw trace here")
    parser.add_argument("--show", type=int, default=3, help="documents shown in full (the summary covers all)")
    parser.add_argument("--top-experts", type=int, default=10, help="rows of the per-expert table")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random model")
    parser.add_argument("--warmup", type=int, default=20, help="controller passes over the input (--random only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no terminal view")
    return parser


def _check_output(path: Path | None) -> None:
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise ValueError(f"cannot write {path}: {'it is a directory' if path.is_dir() else 'no such directory'}")


def _load_model(args) -> tuple[PureReasonerLM, str, TextCodec]:
    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            raise ValueError(f"checkpoint directory {args.checkpoint} does not exist")
        model = load_pretrained(args.checkpoint, map_location=args.device)
        source = str(args.checkpoint)
    else:
        torch.manual_seed(args.seed)
        model = PureReasonerLM(preset(args.random)).to(args.device)
        source = f"random {args.random} (seed {args.seed}, controller settled on the input for {args.warmup} passes)"
    codec = TextCodec.for_model(args.checkpoint, model.cfg.vocab_size)
    return model.eval(), source, codec


@torch.no_grad()
def _settle_controller(model: PureReasonerLM, encoded: list[list[Token]], steps: int) -> None:
    """Let the consult controller of a random model steer toward its target rate on the documents
    themselves (no training): settled on random ids instead, a layer can consult on 60% of real text's
    tokens, whose hidden states differ from those of uniformly random ids."""
    device = next(model.parameters()).device
    for step in range(steps):
        tokens = encoded[step % len(encoded)]
        model.update_controllers(model(torch.tensor([[t.id for t in tokens]], device=device)).stats)


def _colour(count: int, num_layers: int) -> str:
    """rich style for a token that consulted in ``count`` layers."""
    colours = shade(count, num_layers)
    return f"{colours[1]} on {colours[0]}" if colours else ""


def render_terminal(console: Console, docs: list[TracedDoc], summary: dict, meta: dict, show: int, top: int) -> None:
    """Tokens coloured by knowledge use (labels are appended as plain text: never parsed as markup),
    then consult rates and the per-expert table."""
    num_layers = len(meta["moe_blocks"])
    console.print(Text(f"model: {meta['source']}\n{meta['tokens_from']}", style="dim"))
    legend = Text("layers consulted: ")
    for c in range(num_layers + 1):
        legend.append(f" {c} ", style=_colour(c, num_layers))
    legend.append("   underlined: fact-bearing")
    console.print(legend)
    for d, doc in enumerate(docs[:show]):
        line = Text()
        for token, facts, count in zip(doc.tokens, doc.token_facts(), doc.layers_consulted(), strict=True):
            style = " ".join(s for s in (_colour(count, num_layers), "underline" if facts else "",
                                         "dim" if token.placeholder else "") if s)
            line.append(token.label, style=style or None)
        console.print(Text(f"document {d}", style="bold"))
        console.print(line)
    for title, header, rows in (rate_table(summary), expert_table(summary, top)):
        table = Table(title=title, title_justify="left")
        for j, name in enumerate(header):
            table.add_column(name, justify="left" if j == 0 or j >= 5 else "right")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # Text: entity names are never parsed as markup
        console.print(table)


def run(args, console: Console) -> None:
    """Everything the CLI does; raises ValueError on bad input before any file is written."""
    for path in (args.html, args.json):
        _check_output(path)
    if args.text is not None:
        docs = [(args.text, [])]
    else:
        docs = read_jsonl(args.jsonl, args.text_field, args.facts_field)[: args.max_docs]
    model, source, codec = _load_model(args)
    encoded = encode_all(codec, docs, model.cfg.max_seq_len, args.truncate)
    if args.random is not None:
        _settle_controller(model, encoded, args.warmup)
    traced, trace = trace_documents(model, docs, encoded)
    summary = summarize(traced, trace)
    meta = describe(trace, source, codec)
    if not args.quiet:
        render_terminal(console, traced, summary, meta, args.show, args.top_experts)
    outputs = {}
    if args.html is not None:
        outputs[args.html] = render_html(traced[: args.show], summary, meta, args.top_experts)
    if args.json is not None:
        outputs[args.json] = json.dumps(trace_record(traced, summary, meta)) + "\n"
    for path, text in outputs.items():
        atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
        console.print(Text(f"wrote {path}"))  # Text: a path is never parsed as markup


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    """CLI entry; returns the exit status (argparse exits 2 on bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name, least in (("show", 1), ("top_experts", 1), ("max_docs", 1), ("warmup", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    try:
        run(args, console or Console())
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
