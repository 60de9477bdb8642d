"""A knowledge world on disk: the built-in world round-trips (same training batches, same eval report), and a
malformed or incomplete world fails naming its file, line and field."""

import json
from pathlib import Path

import pytest
import torch

from pure_reasoner.moe import PureReasonerLM, preset
from pure_reasoner.train import data
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.evaluation.evaluate import Codec, evaluate
from pure_reasoner.train.loop import prepare_data
from pure_reasoner.train.world.disk import load_world, read_corpus, read_split
from pure_reasoner.train.world.generator import build_world, main, world_config
from pure_reasoner.train.world.splits import SPLITS, split_examples
from tests.train.helpers import compose_config

WORLD = ("preset=tiny", "seed=3", "eval_examples=12")
CPU = DistInfo(0, 1, 0, 1, torch.device("cpu"))
# Every annotation-reading objective at once: closed-book tokens (consult loss, forget pass), recall tokens
# (consult_targets=recall, forget_weight) and fresh drills.
OBJECTIVES = ("model=tiny_reasoner", "data.seq_len=384", "train.micro_batch_size=3", "data.fresh_drills=1",
              "model.knowledge.consult_loss_coef=0.1", "objective.consult_targets=recall",
              "objective.forget_weight=1.0", "objective.read_weight=1.0")


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    main(["--out", str(out), "--preset", "tiny", "--set", "seed=3", "eval_examples=12", "--in-context-fraction",
          "0.5", "--drill-questions", "2"])
    return out


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a world directory without the files in ``drop``."""
    for path in src.rglob("*"):
        if path.is_file() and path.relative_to(src).as_posix() not in drop:
            (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / path.relative_to(src)).write_bytes(path.read_bytes())
    return dst


def _batches(cfg, run_dir: Path) -> tuple[list[dict], str]:
    source, tok = prepare_data(cfg, run_dir, CPU)
    return [source.micro_batch(cfg, CPU, step, 0) for step in range(4)], tok.to_str()


def test_training_batches_round_trip(world_dir, tmp_path):
    generated = compose_config(*OBJECTIVES, "data=world", "data.in_context_fraction=0.5",
                               *(f"+data.generator_kwargs.{kv}" for kv in (*WORLD, "drill_questions=2")))
    on_disk = compose_config(*OBJECTIVES, "data=world_dir", f"data.path={world_dir}")
    want, want_tok = _batches(generated, tmp_path / "a")
    got, got_tok = _batches(on_disk, tmp_path / "b")
    assert got_tok == want_tok
    for a, b in zip(want, got, strict=True):
        assert set(a) == set(b) == {"idx_BS", "targets_BS", "consult_target_BS", "read_BS", "forget_BS"}
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert any(b["forget_BS"].any() for b in got)  # recall tokens are there, so the check above can fail
    other = compose_config(*OBJECTIVES, "data=world", "data.in_context_fraction=0.5",
                           *(f"+data.generator_kwargs.{kv}" for kv in ("preset=tiny", "seed=4", "drill_questions=2")))
    assert not torch.equal(_batches(other, tmp_path / "c")[0][0]["idx_BS"], want[0]["idx_BS"])


def test_eval_report_round_trips(world_dir):
    world = build_world(world_config("tiny", seed=3, eval_examples=12))
    disk = load_world(world_dir)
    assert disk.splits == SPLITS and disk.generated == world
    for split in SPLITS:
        keys = ("id", "prompt", "context", "choices", "gold", "answer", "memorised", "person", "attribute")
        assert [{k: ex[k] for k in keys} for ex in disk.examples(split)] == \
            [{k: ex[k] for k in keys} for ex in split_examples(world, split)]
    torch.manual_seed(0)
    model = PureReasonerLM(preset("tiny")).eval()
    kwargs = dict(ablations=("base", "knowledge_off", "knowledge_mean"), max_examples=6, bits_people=4,
                  batch_size=7)
    want, got = evaluate(model, Codec(), world, **kwargs), evaluate(model, Codec(), disk, **kwargs)
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert got["knowledge_bits"]["people_scored"] == 4 and "not_measured" not in got


def _rewrite(path: Path, line: int, edit) -> None:
    rows = path.read_text().splitlines()
    rows[line - 1] = edit(rows[line - 1])
    path.write_text("\n".join(rows) + "\n")


def _set(**fields):
    return lambda line: json.dumps({**json.loads(line), **fields})


def _drop(field):
    return lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != field})


@pytest.mark.parametrize("file, line, edit, field", [
    ("corpus.jsonl", 3, _drop("text"), "'text' is missing"),
    ("corpus.jsonl", 2, _set(context=7), "'context' must be str"),
    ("corpus.jsonl", 4, _set(recall=[[0, 10**6]]), r"'recall\[0\]' has span"),
    ("corpus.jsonl", 5, lambda s: s[:-3], "malformed JSON"),
    ("corpus.jsonl", 1, lambda s: json.dumps({**json.loads(s), "facts": [{**json.loads(s)["facts"][0],
                                                                           "value": "Nowhere"}]}),
     r"'facts\[0\].value' is 'Nowhere'"),
    ("eval/closed_book.jsonl", 2, _set(gold=9), "'gold' is 9"),
    ("eval/closed_book.jsonl", 3, _set(answer="Elsewhere"), "'answer' is 'Elsewhere'"),
    ("eval/open_book.jsonl", 2, _set(context=""), "'context' is missing or empty"),
    ("eval/counterfactual.jsonl", 1, _drop("memorised"), "'memorised' must be the trained value"),
    ("eval/comparison.jsonl", 4, _set(split="open_book"), "'split' is 'open_book'"),
    ("eval/open_book_two_hop.jsonl", 1, _set(choices=["a", "a"]), "'choices' must be >= 2 distinct"),
])
def test_malformed_file_names_file_line_and_field(world_dir, tmp_path, file, line, edit, field):
    broken = _copy(world_dir, tmp_path / "w")
    _rewrite(broken / file, line, edit)
    split = Path(file).stem
    with pytest.raises(ValueError, match=rf"{file}:{line}: .*{field}" if "JSON" not in field else rf"{file}:{line}: "):
        read_corpus(broken / file) if file == "corpus.jsonl" else read_split(broken / file, split)
    if file == "corpus.jsonl":  # the training entry point reports the same
        with pytest.raises(ValueError, match=rf"{file}:{line}: "):
            data.load_documents(compose_config("data=world_dir", f"data.path={broken}").data)


def test_manifest_is_checked(world_dir, tmp_path):
    broken = _copy(world_dir, tmp_path / "w")
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "schema": 2}))
    with pytest.raises(ValueError, match=r"manifest.json:1: field 'schema' is 2"):
        load_world(broken)
    (broken / "manifest.json").write_text(json.dumps({**manifest, "generator": {"num_people": 0}}))
    with pytest.raises(ValueError, match=r"manifest.json: field 'generator': world.num_people must be > 0"):
        load_world(broken)
    with pytest.raises(ValueError, match="no manifest.json"):
        load_world(tmp_path)


def _without_generator(world_dir: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    out = _copy(world_dir, dst, drop)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "generator": None}))
    return out


def test_objectives_name_the_annotation_a_world_lacks(world_dir, tmp_path):
    """A user world without recall spans, drill material or a reference set: what needs them says so."""
    bare = _without_generator(world_dir, tmp_path / "w", drop=("reference.jsonl",))
    corpus = bare / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({k: v for k, v in json.loads(s).items() if k != "recall"}) + "\n"
                              for s in corpus.read_text().splitlines()))
    recall = compose_config(*OBJECTIVES[:3], "model.knowledge.consult_loss_coef=0.1",
                            "objective.consult_targets=recall",
                            "data=world_dir", f"data.path={bare}")
    with pytest.raises(ValueError, match=r"corpus.jsonl:1: field 'recall' is missing: the recall-token objectives"):
        prepare_data(recall, tmp_path / "r1", CPU)
    drills = compose_config(*OBJECTIVES[:4], "model.knowledge.consult_loss_coef=0.1", "data=world_dir",
                            f"data.path={bare}")
    with pytest.raises(ValueError, match=r"needs drill material in world .*: a drills.jsonl file"):
        prepare_data(drills, tmp_path / "r2", CPU)
    torch.manual_seed(0)
    model = PureReasonerLM(preset("tiny")).eval()
    with pytest.raises(ValueError, match="no reference.jsonl"):
        evaluate(model, Codec(), load_world(bare), ("closed_book",), ("base", "knowledge_mean"), max_examples=2)
    report = evaluate(model, Codec(), load_world(bare), ("closed_book", "open_book"), ("base", "knowledge_off"),
                      max_examples=2, bits_people=4, generate=())
    assert report["knowledge_bits"] is None and "generator" in report["not_measured"]["knowledge_bits"]
    assert report["splits"]["closed_book"]["base"]["n"] == 2


def test_drills_file_feeds_fresh_drills(world_dir, tmp_path):
    """A world without a generator supplies its drills as a file: every micro-batch reads its own sequences."""
    bare = _without_generator(world_dir, tmp_path / "w")
    rows = [json.loads(s) for s in (bare / "corpus.jsonl").read_text().splitlines()]
    (bare / "drills.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["kind"] == "drill"))
    cfg = compose_config(*OBJECTIVES[:4], "data=world_dir", f"data.path={bare}")
    source, tok = prepare_data(cfg, tmp_path / "r", CPU)
    a, b = (source.micro_batch(cfg, CPU, step, 0) for step in (0, 1))
    drill_a, drill_b = a["idx_BS"][-1], b["idx_BS"][-1]
    assert not torch.equal(drill_a, drill_b)
    text = tok.decode(drill_a.tolist(), skip_special_tokens=False)
    assert "Q: " in text and (a["targets_BS"][-1] == -100).any()  # the context carries no loss
    counterfactual = compose_config(*OBJECTIVES[:4], "data.counterfactual_drills=0.5", "data=world_dir",
                                    f"data.path={bare}")
    with pytest.raises(ValueError, match=r"counterfactual_drills=0.5 needs the known people of world .*generator"):
        prepare_data(counterfactual, tmp_path / "r", CPU)
    weighted = compose_config(*OBJECTIVES[:4], "+data.drill_attribute_weights.birth_date=3", "data=world_dir",
                              f"data.path={bare}")
    with pytest.raises(ValueError, match=r"drill_attribute_weights=\{'birth_date': 3.0\} needs a 'generator'"):
        prepare_data(weighted, tmp_path / "r", CPU)
    fewer = compose_config(*OBJECTIVES[:4], "data.drill_distractors=0", "data=world_dir", f"data.path={bare}")
    with pytest.raises(ValueError, match=r"drill_distractors=0 needs a 'generator'"):
        prepare_data(fewer, tmp_path / "r", CPU)
    (bare / "drills.jsonl").write_text(json.dumps({"text": "Q: x?\nA: y."}) + "\n")
    with pytest.raises(ValueError, match=r"drills.jsonl:1: field 'context' is missing or empty"):
        prepare_data(cfg, tmp_path / "r3", CPU)
