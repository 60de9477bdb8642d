"""moe.inspect and its pieces: tokens and spans, the summary on hand-made routing, the CLI on a random
model and on saved checkpoints, bad input, untrusted text in every view, and the page in a real browser."""

import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pure_reasoner.moe import PureReasonerLM, preset
from pure_reasoner.moe.checkpoint import CONFIG, load_pretrained, save_pretrained
from pure_reasoner.moe.inspect import main
from pure_reasoner.moe.trace import KnowledgeTrace, record_knowledge_trace
from pure_reasoner.moe.trace_report import TracedDoc, summarize
from pure_reasoner.moe.trace_text import TOKENIZER, Fact, TextCodec, read_jsonl, visible

DEMO = Path(__file__).parents[2] / "docs" / "knowledge_trace_demo.jsonl"
# Each payload would mark <body data-pwned> if it ever ran as markup or script.
PAYLOADS = [
    '<script>document.body.dataset.pwned="script"</script>',
    '"><img src=x onerror="document.body.dataset.pwned=\'img\'">',
    "</script><script>document.body.dataset.pwned='json'</script><!--",
    "<svg onload=\"document.body.dataset.pwned='svg'\"></svg>",
    "\u2028 [bold]rich[/bold] \x1b[31mred \u202eevil &amp;",
]
NUM_DEMO = 3  # documents in DEMO; the demo run adds one document per payload after them
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "main", "section",
             "article", "div", "span", "aside", "table", "tbody", "tr", "th", "td", "script"}  # browsers add tbody


class Dom(HTMLParser):
    """Tags, event-handler attributes, <body> attributes and the text of each token span."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.handlers, self.body, self.tokens, self.detail = Counter(), [], {}, {}, []
        self._token, self._in_detail = None, 0
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        self.handlers += [name for name in attrs if name.startswith("on")]
        if tag == "body":
            self.body = attrs
        if tag == "span" and "data-i" in attrs:
            self._token = (int(attrs["data-d"]), int(attrs["data-i"]))
            self.tokens[self._token] = ""
        if tag == "aside" or self._in_detail:
            self._in_detail += 1

    def handle_endtag(self, tag):
        if tag == "span":
            self._token = None
        if self._in_detail:
            self._in_detail -= 1

    def handle_data(self, data):
        if self._token is not None:
            self.tokens[self._token] += data
        if self._in_detail:
            self.detail.append(data)


def _bpe(texts: list[str], vocab_size: int = 300) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts * 20, trainer)
    return tokenizer


def _checkpoint(directory: Path, **overrides) -> Path:
    cfg = preset("tiny")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = PureReasonerLM(cfg)
    for layer in model.moe_layers():  # a moderate consult rate, so the trace has both kinds of token
        layer.router.margin_threshold.fill_(0.3)
    return save_pretrained(model, directory)


def _run(argv: list, console: Console | None = None) -> int:
    quiet = Console(file=io.StringIO())
    return main([str(a) for a in argv], console=console or quiet)


# ---- tokens, labels, annotated JSONL ----------------------------------------------------------------


def test_byte_tokens_and_visible_labels():
    tokens = TextCodec.for_model(None, 512).encode("aé\n\x1b\u202e")
    assert [t.id for t in tokens] == [0x61, 0xC3, 0xA9, 0x0A, 0x1B, 0xE2, 0x80, 0xAE]
    assert [t.label for t in tokens] == ["a", "é", "\\xa9", "↵\n", "\\x1b", "\\u202e", "\\x80", "\\xae"]
    assert [(t.start, t.end) for t in tokens] == [(0, 1), (1, 2), (1, 2), (2, 3), (3, 4), (4, 5), (4, 5), (4, 5)]
    assert [t.placeholder for t in tokens] == [False, False, True, False, False, False, True, True]
    with pytest.raises(ValueError, match="text is empty"):
        TextCodec.for_model(None, 512).encode("")
    with pytest.raises(ValueError, match="vocab_size >= 256; model has 200"):
        TextCodec.for_model(None, 200)


def test_hf_tokenizer_tokens_cover_the_text(tmp_path):
    text = "Zorblat Quen was born in  Vesk.\tHe studied é"
    tokenizer = _bpe([text, "Mirela read economics"])
    tokenizer.save(str(tmp_path / TOKENIZER))
    codec = TextCodec.for_model(tmp_path, 512)
    tokens = codec.encode(text)
    assert [t.id for t in tokens] == tokenizer.encode(text).ids
    assert "".join(t.label for t in tokens if not t.placeholder) == visible(text)
    assert TOKENIZER in codec.description
    with pytest.raises(ValueError, match="but the model's vocab_size is 64"):
        TextCodec.for_model(tmp_path, 64)
    (tmp_path / TOKENIZER).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer"):
        TextCodec.for_model(tmp_path, 512)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": "broken"\n', ":2: not valid JSON"),
        (b'{"body": "no text field"}\n', "needs a string field 'text'"),
        (b'{"text": ""}\n', "field 'text' is empty"),
        (b"\n\n", "holds no documents"),
        (b'{"text": "caf\xe9"}\n', "cannot read"),  # latin-1, not UTF-8
        (b'{"text": "abc", "facts": [{"start": 1, "end": 9, "type": "t", "entity": "e"}]}\n', "not inside the text"),
        (b'{"text": "abc", "facts": [{"start": true, "end": 2, "type": "t", "entity": "e"}]}\n', "not inside"),
        (b'{"text": "abc", "facts": [{"start": 0, "end": 2, "type": "t"}]}\n', "exactly start, end, type, entity"),
        (b'{"text": "abc", "facts": {"start": 0}}\n', "facts must be a list"),
    ],
    ids=["malformed", "no-field", "empty-text", "no-docs", "not-utf8", "span-out", "bool-start", "keys", "not-list"],
)
def test_read_jsonl_rejects(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_read_jsonl_reads_facts_and_other_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"question": "Who?", "spans": [{"start": 0, "end": 3, "type": "q", "entity": "x"}]}\n')
    assert read_jsonl(path, "question", "spans") == [("Who?", [Fact(0, 3, "q", "x")])]


# ---- the summary, on routing written by hand -------------------------------------------------------------


def test_summary_on_hand_made_routing():
    """Text "ab cd": "ab" is a name of X, "cd" a city of X; one space in between. Two layers, K=2, E=4."""
    tokens = TextCodec.for_model(None, 512).encode("ab cd")
    ids_LSK = torch.tensor([
        [[1, -1], [1, 2], [-1, -1], [3, -1], [-1, -1]],  # layer 0: a, b, c consult
        [[-1, -1], [-1, -1], [0, -1], [-1, -1], [-1, -1]],  # layer 1: only the space consults
    ])
    gates_LSK = torch.tensor([
        [[0.6, 0], [0.3, 0.2], [0, 0], [0.9, 0], [0, 0]],
        [[0, 0], [0, 0], [0.5, 0], [0, 0], [0, 0]],
    ])
    facts = [Fact(0, 2, "name", "X"), Fact(3, 5, "city", "X")]
    doc = TracedDoc("ab cd", tokens, facts, ids_LSK, gates_LSK)
    summary = summarize([doc], KnowledgeTrace([1, 3], num_experts=4, top_k=2))
    assert (summary["num_tokens"], summary["num_fact_tokens"]) == (5, 4)
    layer0, layer1 = summary["layers"]
    assert layer0 == {"block": 1, "consult_rate": 0.6, "consult_rate_fact": 0.75, "consult_rate_other": 0.0,
                      "fact_vs_other": None}
    assert layer1 == {"block": 3, "consult_rate": 0.2, "consult_rate_fact": 0.0, "consult_rate_other": 1.0,
                      "fact_vs_other": 0.0}
    assert summary["any_layer"]["consult_rate"] == 0.8 and summary["any_layer"]["fact_vs_other"] == 0.75
    experts = {(x["layer"], x["expert"]): x for x in summary["experts"]}
    # Layer 0 routed 4 slots: 3 on name tokens (a: e1; b: e1, e2), 1 on a city token (c: e3).
    e1 = experts[0, 1]
    assert (e1["slots"], e1["fact_share"], e1["block"]) == (2, 1.0, 1)
    assert e1["mean_gate"] == pytest.approx(0.45)
    assert e1["types"] == [{"type": "name", "slots": 2, "lift": pytest.approx((2 / 2) / (3 / 4))}]
    assert e1["entities"] == [{"entity": "X", "slots": 2}]
    assert experts[0, 3]["types"] == [{"type": "city", "slots": 1, "lift": pytest.approx(4.0)}]
    assert experts[0, 0]["slots"] == 0 and experts[0, 0]["mean_gate"] is None
    assert (experts[1, 0]["slots"], experts[1, 0]["fact_share"], experts[1, 0]["types"]) == (1, 0.0, [])


# ---- the CLI -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The CLI on a saved tiny checkpoint with a BPE tokenizer.json in which every payload is one token
    (byte-level labels are single characters, which cannot form markup even unescaped; whole-payload
    labels can). Documents: the demo ones, then one per payload with a hostile fact annotation."""
    out = tmp_path_factory.mktemp("demo")
    ckpt = _checkpoint(out / "ckpt")
    tokenizer = _bpe([text for text, _ in read_jsonl(DEMO)], vocab_size=400)
    tokenizer.add_tokens(PAYLOADS)
    tokenizer.save(str(ckpt / TOKENIZER))
    fact = {"start": 0, "end": 20, "type": PAYLOADS[2], "entity": PAYLOADS[1]}
    hostile = "".join(json.dumps({"text": text, "facts": [fact]}) + "\n" for text in PAYLOADS)
    (out / "docs.jsonl").write_text(DEMO.read_text() + hostile)
    argv = ["--checkpoint", ckpt, "--jsonl", out / "docs.jsonl", "--show", 99, "--top-experts", 50,
            "--html", out / "trace.html", "--json", out / "trace.json"]
    assert _run(argv) == 0
    return out, json.loads((out / "trace.json").read_text()), tokenizer


def test_html_is_complete_and_inert(demo):
    out, trace, _ = demo
    page = (out / "trace.html").read_text()
    dom = Dom(page)
    assert set(dom.tags) <= PAGE_TAGS and dom.tags["script"] == 2 and not dom.handlers
    labels = {(d, i): t["label"] for d, doc in enumerate(trace["documents"]) for i, t in enumerate(doc["tokens"])}
    assert dom.tokens == labels  # every token, as literal text
    for d, text in enumerate(PAYLOADS, NUM_DEMO):
        assert [t["label"] for t in trace["documents"][d]["tokens"]] == [visible(text)]  # one whole-payload token
    data = page.split('<script type="application/json" id="trace-data">')[1].split("</script>")[0]
    assert "<" not in data and "\u2028" not in data
    assert json.loads(data)["docs"] == [
        {"labels": [t["label"] for t in doc["tokens"]], "ids": [t["id"] for t in doc["tokens"]],
         "layers": [t["layers"] for t in doc["tokens"]], "facts": [[f["type"], f["entity"]] for f in doc["facts"]],
         "tokenFacts": [[0] if doc["facts"] and t["start"] < 20 else [] for t in doc["tokens"]] if d >= NUM_DEMO
         else json.loads(data)["docs"][d]["tokenFacts"]}
        for d, doc in enumerate(trace["documents"])
    ]
    assert "default-src 'none'" in page and "http://" not in page and "https://" not in page


def test_json_trace_and_summary(demo):
    _, trace, tokenizer = demo
    assert trace["format"] == "pure-reasoner.knowledge-trace" and TOKENIZER in trace["tokens_from"]
    assert trace["moe_blocks"] == [0, 1] and len(trace["documents"]) == NUM_DEMO + len(PAYLOADS)
    # Fact-bearing: the tokenizer's character span of the token overlaps a fact span.
    num_fact_tokens = len(PAYLOADS) + sum(
        any(a < f.end and f.start < b for f in facts)
        for text, facts in read_jsonl(DEMO) for a, b in tokenizer.encode(text).offsets
    )
    assert trace["summary"]["num_fact_tokens"] == num_fact_tokens
    assert [t["id"] for t in trace["documents"][0]["tokens"]] == tokenizer.encode(read_jsonl(DEMO)[0][0]).ids
    assert {x["expert"] for x in trace["summary"]["experts"]} == set(range(8))
    for doc in trace["documents"]:
        for token in doc["tokens"]:
            assert len(token["layers"]) == 2 and all(len(slots) <= 2 for slots in token["layers"])


def test_cli_on_checkpoint_matches_the_api(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    text = "Mirela Tovasch grew up in Prandt."
    assert _run(["--checkpoint", ckpt, "--text", text, "--json", tmp_path / "t.json"]) == 0
    trace = json.loads((tmp_path / "t.json").read_text())
    assert f"no {TOKENIZER} in {ckpt}" in trace["tokens_from"]
    model = load_pretrained(ckpt).eval()
    idx = torch.tensor([list(text.encode())])
    with torch.no_grad(), record_knowledge_trace(model) as direct:
        model(idx)
    (p,) = direct.passes
    tokens = trace["documents"][0]["tokens"]
    assert [t["id"] for t in tokens] == idx[0].tolist()
    for s, token in enumerate(tokens):
        for layer, slots in enumerate(token["layers"]):
            consulted = p.expert_ids_LBSK[layer, 0, s] >= 0
            assert [e for e, _ in slots] == p.expert_ids_LBSK[layer, 0, s][consulted].tolist()
            assert [g for _, g in slots] == pytest.approx(p.gates_LBSK[layer, 0, s][consulted].tolist(), abs=1e-6)
    consulted_tokens = sum(any(layers) for layers in (t["layers"] for t in tokens))
    assert 0 < consulted_tokens < len(tokens)


def test_cli_uses_the_checkpoints_tokenizer(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    text = "Zorblat Quen was born in Vesk."
    tokenizer = _bpe([text])
    tokenizer.save(str(ckpt / TOKENIZER))
    assert _run(["--checkpoint", ckpt, "--text", text, "--json", tmp_path / "t.json"]) == 0
    trace = json.loads((tmp_path / "t.json").read_text())
    assert TOKENIZER in trace["tokens_from"]
    assert [t["id"] for t in trace["documents"][0]["tokens"]] == tokenizer.encode(text).ids


def test_terminal_view_shows_text_never_markup_or_escapes():
    plain = Console(file=io.StringIO(), width=400, color_system=None)
    assert _run(["--random", "tiny", "--warmup", "0", "--text", PAYLOADS[0] + PAYLOADS[4]], console=plain) == 0
    shown = plain.file.getvalue()
    assert "[bold]rich[/bold]" in shown and "\\x1b[31mred" in shown and "\\u202e\\x80\\xaeevil" in shown
    assert "\x1b" not in shown and "\u202e" not in shown and "\u2028" not in shown
    coloured = Console(file=io.StringIO(), width=400, color_system="truecolor", force_terminal=True)
    assert _run(["--random", "tiny", "--warmup", "0", "--text", "hello there, Vesk"], console=coloured) == 0
    assert "\x1b[" in coloured.file.getvalue()  # tokens are coloured when the terminal can show it


def _bad_cases(tmp: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, message); built lazily per case so each gets fresh files."""
    rand = ["--random", "tiny", "--warmup", "0"]
    return {
        "missing-checkpoint": (["--checkpoint", tmp / "nope", "--text", "hi"], "does not exist"),
        "no-config": (["--checkpoint", tmp, "--text", "hi"], "has no config.json"),
        "empty-text": ([*rand, "--text", ""], "text is empty"),
        "too-long": ([*rand, "--text", "x" * 129], "129 tokens, over model.max_seq_len=128"),
        "jsonl-missing": ([*rand, "--jsonl", tmp / "none.jsonl"], "cannot read"),
        "html-dir-missing": ([*rand, "--text", "hi", "--html", tmp / "no" / "t.html"], "no such directory"),
        "json-is-dir": ([*rand, "--text", "hi", "--json", tmp], "it is a directory"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(Path("."))))
def test_bad_input_fails_and_writes_nothing(tmp_path, capsys, case):
    argv, message = _bad_cases(tmp_path)[case]
    given = "--html" in argv or "--json" in argv
    outputs = [] if given else ["--html", tmp_path / "t.html", "--json", tmp_path / "t.json"]
    assert _run([*argv, *outputs]) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.html")) and not list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("problem", ["incompatible-config", "unknown-key", "tokenizer-too-big", "small-vocab", "dense"])
def test_bad_checkpoint_fails_and_writes_nothing(tmp_path, capsys, problem):
    overrides = {"dense": {"dense_first_layers": 2, "dense_width": 64}, "small-vocab": {"vocab_size": 200},
                 "tokenizer-too-big": {"vocab_size": 280}}.get(problem, {})
    ckpt = _checkpoint(tmp_path / "ckpt", **overrides)
    cfg = json.loads((ckpt / CONFIG).read_text())
    if problem == "incompatible-config":
        (ckpt / CONFIG).write_text(json.dumps({**cfg, "d_model": 32}))
    if problem == "unknown-key":
        (ckpt / CONFIG).write_text(json.dumps({**cfg, "flux_capacitor": 1}))
    if problem == "tokenizer-too-big":
        words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
        words.save(str(ckpt / TOKENIZER))
    message = {"incompatible-config": "does not match its config", "unknown-key": "flux_capacitor",
               "tokenizer-too-big": "has 300 tokens but the model's vocab_size is 280",
               "small-vocab": "vocab_size >= 256", "dense": "no MoE layers"}[problem]
    out = [tmp_path / "t.html", tmp_path / "t.json"]
    assert _run(["--checkpoint", ckpt, "--text", "hi", "--html", out[0], "--json", out[1]]) == 1
    assert message in capsys.readouterr().err
    assert not any(p.exists() for p in out)


def test_usage_errors_exit_2():
    for argv in ([], ["--random", "tiny"], ["--random", "tiny", "--text", "a", "--show", "0"],
                 ["--random", "tiny", "--checkpoint", "x", "--text", "a"]):
        with pytest.raises(SystemExit) as exit_info:
            _run(argv)
        assert exit_info.value.code == 2


def test_entry_point(tmp_path):
    """``python -m pure_reasoner.moe.inspect`` itself: exit status 1 with a message, or 0 with the file written."""
    cmd = [sys.executable, "-m", "pure_reasoner.moe.inspect"]
    bad = subprocess.run([*cmd, "--checkpoint", tmp_path / "missing", "--text", "hi"], capture_output=True, text=True)
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    good = subprocess.run([*cmd, "--random", "tiny", "--warmup", "1", "--text", "hi", "--json", tmp_path / "t.json"],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert json.loads((tmp_path / "t.json").read_text())["documents"][0]["text"] == "hi"


# ---- the page in a real browser ----------------------------------------------------------------------------


@pytest.fixture
def chromium(tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it as root)")

    def run(url: str, *flags: str) -> str:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", *flags, url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


def test_browser_runs_live_markup(chromium, tmp_path):
    """Control: in this headless browser an unescaped handler does run and does leave its mark, so the
    next test's 'no mark' means the page is inert, not that the browser ignores handlers."""
    page = tmp_path / "live.html"
    page.write_text(f"<!doctype html><html><body><p>x</p>{PAYLOADS[1][2:]}</body></html>")
    dom = Dom(chromium(page.as_uri(), "--dump-dom"))
    assert dom.tags["img"] == 1 and dom.body.get("data-pwned") == "img"


def test_browser_renders_every_token_inert(chromium, demo, tmp_path):
    out, trace, _ = demo
    docs = trace["documents"]
    d, pinned = NUM_DEMO + 1, 0  # the <img> payload's one token
    dom = Dom(chromium(f"{(out / 'trace.html').as_uri()}#t={d}.{pinned}", "--dump-dom"))
    assert dom.tokens == {(d, i): t["label"] for d, doc in enumerate(docs) for i, t in enumerate(doc["tokens"])}
    assert set(dom.tags) <= PAGE_TAGS and dom.tags["script"] == 2 and not dom.handlers
    assert "data-pwned" not in dom.body
    # The detail panel, built by the page's script, shows the pinned token's experts and gates.
    token = docs[d]["tokens"][pinned]
    expected = [token["label"], f"document {d} · token {pinned} · id {token['id']}", f"{PAYLOADS[2]}: {PAYLOADS[1]}"]
    for block, slots in zip(trace["moe_blocks"], token["layers"], strict=True):
        expected.append(f"block {block}")
        expected += [s for e, g in slots for s in (f"expert {e}", f"{g:.3f}")] or ["not consulted"]
    assert dom.detail == expected
    shot = tmp_path / "trace.png"
    fact_token = next((i for i, t in enumerate(docs[0]["tokens"]) if t["start"] >= 42 and any(t["layers"])), 0)
    chromium(f"{(out / 'trace.html').as_uri()}#t=0.{fact_token}", "--hide-scrollbars", "--window-size=1200,760",
             f"--screenshot={shot}")
    _check_screenshot(shot, (760, 1200))


def _check_screenshot(path: Path, shape_HW: tuple[int, int]) -> None:
    """A PNG of the window's size in which the token colours (the page's CSS) are visible."""
    from matplotlib.image import imread

    from pure_reasoner.moe.trace_report import shade

    pixels_HWC = imread(path)[..., :3]
    assert pixels_HWC.shape[:2] == shape_HW
    orange = torch.tensor([int(shade(1, 2)[0][j : j + 2], 16) / 255 for j in (1, 3, 5)])
    close = (torch.from_numpy(pixels_HWC.copy()) - orange).abs().amax(-1) < 0.02
    assert int(close.sum()) > 200  # at least a few consulted tokens painted in the 1-layer colour
