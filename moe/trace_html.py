"""The knowledge trace as one self-contained HTML page: tokens coloured by knowledge use; hovering a
token shows, per MoE layer, the experts it consulted and their gates; a click pins it (``#t=D.I``).

Nothing is fetched: CSS and JS are inline, and a Content-Security-Policy allows only those two blocks
(by hash) and no network at all. Text is untrusted: every string that reaches markup goes through
``html.escape``; the data block is JSON with ``<``, ``>``, ``&`` and U+2028/9 written as ``\\uXXXX``,
so no token can close the ``<script>`` element it sits in; the script builds the detail panel with
``textContent`` only. The CSP is a second fence behind the escaping, not a replacement for it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json

from pure_reasoner.moe.trace_report import TracedDoc, expert_table, rate_table, shade, token_layers

_SCRIPT = r"""
"use strict";
(() => {
  const data = JSON.parse(document.getElementById("trace-data").textContent);
  const panel = document.getElementById("detail");
  let pinned = null;
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  function show(d, i) {
    const doc = data.docs[d];
    if (!doc || i >= doc.ids.length) return;
    const where = `document ${d} · token ${i} · id ${doc.ids[i]}`;
    panel.replaceChildren(el("div", "tok", doc.labels[i]), el("div", "sub", where));
    for (const f of doc.tokenFacts[i]) panel.append(el("div", "fact", `${doc.facts[f][0]}: ${doc.facts[f][1]}`));
    const table = el("table");
    doc.layers[i].forEach((slots, l) => {
      const row = el("tr");
      const cell = el("td");
      row.append(el("th", "", `block ${data.blocks[l]}`), cell);
      if (!slots.length) cell.append(el("span", "none", "not consulted"));
      for (const [e, g] of slots) {
        const slot = el("span", "slot");
        const bar = el("span", "bar");
        bar.style.width = `${Math.round(48 * g) + 1}px`;
        slot.append(el("span", "eid", `expert ${e}`), bar, el("span", "gate", g.toFixed(3)));
        cell.append(slot);
      }
      table.append(row);
    });
    panel.append(table);
  }
  function fromHash() {
    if (pinned) pinned.classList.remove("pinned");
    pinned = null;
    const m = /^#t=(\d+)\.(\d+)$/.exec(location.hash);
    const t = m && document.querySelector(`.t[data-d="${m[1]}"][data-i="${m[2]}"]`);
    if (!t) return;
    pinned = t;
    t.classList.add("pinned");
    show(+m[1], +m[2]);
  }
  document.addEventListener("mouseover", (ev) => {
    const t = ev.target.closest(".t[data-i]");
    if (t && !pinned) show(+t.dataset.d, +t.dataset.i);
  });
  document.addEventListener("click", (ev) => {
    const t = ev.target.closest(".t[data-i]");
    if (t) location.hash = t === pinned ? "" : `t=${t.dataset.d}.${t.dataset.i}`;
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
"""

_CSS = """
body { font: 14px/1.5 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
header, #summary { padding: 12px 20px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 14px; margin: 12px 0 4px; color: #555; }
.meta, .legend { margin: 2px 0; color: #444; }
main { display: flex; gap: 16px; padding: 0 20px; align-items: flex-start; }
#docs { flex: 1; min-width: 0; }
.text { font: 15px/1.9 ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere;
  background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; }
.t { border-radius: 3px; padding: 1px 0; cursor: pointer; }
.t:hover, .t.pinned { outline: 2px solid #1f5fbf; }
.t.f { text-decoration: underline 2px #7a1fbf; text-underline-offset: 4px; }
.t.ph { color: #888; font-size: 11px; }
#detail { position: sticky; top: 12px; width: 340px; background: #fff; border: 1px solid #ddd;
  border-radius: 6px; padding: 10px 12px; }
#detail .tok { font: 18px ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere; }
#detail .sub, .none { color: #777; font-size: 12px; } #detail .fact { color: #7a1fbf; }
#detail table { border-collapse: collapse; margin-top: 6px; width: 100%; }
#detail th { text-align: left; font-weight: 600; padding: 3px 8px 3px 0; white-space: nowrap; vertical-align: top; }
.slot { display: flex; align-items: center; gap: 6px; } .eid { width: 68px; }
.bar { display: inline-block; height: 10px; background: #d9822b; border-radius: 2px; }
.gate { color: #555; font-size: 12px; }
table.sum { border-collapse: collapse; margin: 6px 0 14px; background: #fff; }
table.sum th, table.sum td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.sum .l { text-align: left; }
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def json_for_script(value) -> str:
    """JSON that is safe inside a ``<script>`` element: it can never contain ``</script>``, ``<!--``
    or a line separator that ends a JavaScript string."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _colour_css(num_layers: int) -> str:
    """Class k<c> for a token that consulted knowledge in c of the L layers (``shade``'s scale)."""
    rules = [".k0 { background: transparent; }"]
    for c in range(1, num_layers + 1):
        background, ink = shade(c, num_layers)
        rules.append(f".k{c} {{ background: {background}; color: {ink}; }}")
    return "\n".join(rules)


def _doc_html(d: int, doc: TracedDoc) -> str:
    """Token spans; class k<c> = layers consulted, f = fact-bearing, ph = placeholder label."""
    spans = []
    for i, (token, facts, count) in enumerate(zip(doc.tokens, doc.token_facts(), doc.layers_consulted(), strict=True)):
        classes = f"t k{count}" + (" f" if facts else "") + (" ph" if token.placeholder else "")
        spans.append(f'<span class="{classes}" data-d="{d}" data-i="{i}">{html.escape(token.label)}</span>')
    return f'<article class="doc" id="d{d}"><h2>Document {d}</h2><div class="text">{"".join(spans)}</div></article>'


def _doc_data(doc: TracedDoc) -> dict:
    fact_index = {f: j for j, f in enumerate(doc.facts)}
    return {
        "labels": [t.label for t in doc.tokens],
        "ids": [t.id for t in doc.tokens],
        "layers": token_layers(doc),
        "facts": [[f.type, f.entity] for f in doc.facts],
        "tokenFacts": [[fact_index[f] for f in facts] for facts in doc.token_facts()],
    }


def _table_html(title: str, header: list[str], rows: list[list[str]]) -> str:
    """An escaped table; the first column and text columns (index >= 5) left-aligned."""
    e = html.escape

    def cells(tag: str, values: list[str]) -> str:
        return "".join(f'<{tag}{"" if 0 < j < 5 else " class=l"}>{e(v)}</{tag}>' for j, v in enumerate(values))

    head = cells("th", header)
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f'<h2>{e(title)}</h2><table class="sum"><tr>{head}</tr>{body}</table>'


def render_html(docs: list[TracedDoc], summary: dict, meta: dict, top_experts: int = 20) -> str:
    """The page for ``docs`` (each shown in full) with ``summary`` from ``trace_report.summarize``.

    meta: ``source`` (model), ``tokens_from`` (codec description), ``moe_blocks``, ``num_experts``,
    ``top_k`` — shown in the header.
    """
    num_layers = len(meta["moe_blocks"])
    css = _CSS + _colour_css(num_layers)
    data = {"blocks": meta["moe_blocks"], "docs": [_doc_data(d) for d in docs]}
    csp = (f"default-src 'none'; style-src {_sha256(css)}; script-src {_sha256(_SCRIPT)}; "
           "base-uri 'none'; form-action 'none'")
    legend = "".join(f'<span class="t k{c}">&nbsp;{c}&nbsp;</span> ' for c in range(num_layers + 1))
    e = html.escape
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>Knowledge trace</title><style>{css}</style></head><body>"
        "<header><h1>Knowledge trace</h1>"
        f'<p class="meta">model: {e(meta["source"])} · {e(meta["tokens_from"])} · {num_layers} MoE layer(s) '
        f'(blocks {e(", ".join(map(str, meta["moe_blocks"])))}) · {meta["num_experts"]} knowledge experts, '
        f"top-{meta['top_k']}</p>"
        f'<p class="legend">Colour = MoE layers in which the token consulted knowledge: {legend}· '
        "underlined: fact-bearing · hover a token for its experts and gates, click to pin.</p></header>"
        f'<main><section id="docs">{"".join(_doc_html(i, d) for i, d in enumerate(docs))}'
        '</section><aside id="detail"><p class="sub">Hover a token to see which knowledge experts it consulted, '
        'layer by layer, with their gates.</p></aside></main>'
        f'<section id="summary">{_table_html(*rate_table(summary))}{_table_html(*expert_table(summary, top_experts))}'
        "</section>"
        f'<script type="application/json" id="trace-data">{json_for_script(data)}</script>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
