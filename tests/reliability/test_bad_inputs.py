"""A corpus of bad inputs: each fails with an error naming the offending value and writes nothing.

One table, four kinds: configs (composed as ``python -m pure_reasoner.train`` composes them), data (trained in
process, the run directory must stay empty), exported checkpoints and tokenizers, and tensors at the
public API. A handful of cases also run the real CLIs as subprocesses (exit status != 0, no output).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from pure_reasoner import kernels
from pure_reasoner.moe import PureReasonerLM, preset
from pure_reasoner.moe.checkpoint import CONFIG, WEIGHTS, load_pretrained, save_pretrained
from pure_reasoner.train.config import to_config
from pure_reasoner.train.evaluation.evaluate import load_codec
from pure_reasoner.train.protocol import RANK_VARIABLES
from tests.train.helpers import compose_raw, run_in_process

REPO = Path(__file__).resolve().parents[2]


class Boom:
    """Unpickling this creates the file named in its argument: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weight": Boom(marker)}))
    return path


def _nothing_in(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


# ------------------------------------------------------------------ configs
CONFIG_CASES = {
    "unknown_key_appended": (["+train.bogus=1"], ValueError, r"unknown config keys \['train.bogus'\]"),
    "unknown_nested_key": (["+model.knowledge.flux=2"], ValueError, r"model.knowledge.flux"),
    "unknown_key_typo": (["train.lrr=0.1"], ConfigCompositionException, r"train.lrr"),
    "wrong_type_float": (["train.lr=fast"], ConfigCompositionException, r"train.lr=fast"),
    "wrong_type_bool": (["train.resume=maybe"], ConfigCompositionException, r"train.resume=maybe"),
    "top_k_over_experts": (["model.knowledge.top_k=99"], ValueError, r"top_k=99 exceeds .*num_experts=8"),
    "rate_above_one": (["model.knowledge.consult_rate=1.5"], ValueError, r"consult_rate must be in \[0, 1\], got 1.5"),
    "rate_below_zero": (["model.knowledge.consult_rate=-0.1"], ValueError, r"got -0.1"),
    "zero_d_model": (["model.d_model=0"], ValueError, r"model.d_model must be > 0, got 0"),
    "negative_experts": (["model.knowledge.num_experts=-4"], ValueError, r"num_experts must be > 0, got -4"),
    "negative_batch": (["train.micro_batch_size=-1"], ValueError, r"train.micro_batch_size must be > 0, got -1"),
    "zero_seq_len": (["data.seq_len=0"], ValueError, r"data.seq_len must be > 0, got 0"),
    "seq_over_max": (["data.seq_len=100000"], ValueError, r"data.seq_len=100000 exceeds model.max_seq_len"),
    "zero3_with_moe": (["deepspeed.zero_stage=3"], ValueError, r"deepspeed.zero_stage must be 0, 1 or 2, got 3"),
    "missing_deepspeed_file": (["deepspeed=[zero9]"], MissingConfigException, r"deepspeed/zero9"),
    "unknown_precision": (["deepspeed.precision=fp16"], ValueError, r"got 'fp16'"),
    "unknown_nonfinite_policy": (["train.on_nonfinite=ignore"], ValueError, r"got 'ignore'"),
    "collapse_share_above_one": (["train.collapse_max_share=1.5"], ValueError, r"collapse_max_share .* got 1.5"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(case):
    overrides, error, match = CONFIG_CASES[case]
    with pytest.raises(error, match=match):
        to_config(compose_raw("experiment=smoke", *overrides))


# ------------------------------------------------------------------ data
def _data_file(tmp: Path, case: str) -> tuple[list[str], str]:
    """(overrides, error pattern) of one bad corpus written under ``tmp``."""
    files = {
        "missing_file": ("gone.jsonl", None, r"gone.jsonl does not exist"),
        "empty_file": ("empty.jsonl", b"", r"empty.jsonl is empty"),
        "malformed_json_line": ("bad.jsonl", b'{"text": "a"}\n{"text": ]\n', r"bad.jsonl:2: malformed JSON line"),
        "wrong_column": ("col.jsonl", b'{"body": "words"}\n', r"no field 'text'"),
        "wrong_column_type": ("num.jsonl", b'{"text": 5}\n', r"field 'text' holds .*int64.*, not text"),
        "array_line": ("arr.jsonl", b'{"text": "a"}\n[1, 2]\n{"text": "b"}\n',
                       r"arr.jsonl:2: not a JSON object: '\[1, 2\]'"),
        "string_line": ("str.jsonl", b'{"text": "a"}\n\n"words"\n', r"str.jsonl:3: not a JSON object: '\"words\"'"),
        "null_line": ("null.jsonl", b'{"text": "a"}\nnull\n', r"null.jsonl:2: not a JSON object: 'null'"),
        "line_without_the_column": ("part.jsonl", b'{"text": "a"}\n{"body": "b"}\n',
                                    r"part.jsonl:2: field 'text' is None"),
        "non_utf8_jsonl": ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin.jsonl:2: not UTF-8"),
        "non_utf8_txt": (
            "bin.txt",
            b"hello \xff\xfe world\n",
            r"bin.txt:1: not UTF-8 text \(byte b'\\xff' at offset 6",
        ),
    }
    name, content, match = files[case]
    if content is not None:
        (tmp / name).write_bytes(content)
    return ["data=files", f"data.files=[{tmp / name}]"], match


DATA_CASES = [
    "missing_file",
    "empty_file",
    "malformed_json_line",
    "wrong_column",
    "wrong_column_type",
    "array_line",
    "string_line",
    "null_line",
    "line_without_the_column",
    "non_utf8_jsonl",
    "non_utf8_txt",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data(tmp_path, case, dist_info):
    overrides, match = _data_file(tmp_path, case)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        run_in_process(run_dir, *overrides)
    assert _nothing_in(run_dir)


# ------------------------------------------------------------------ checkpoints and tokenizers
@pytest.fixture
def exported(tmp_path) -> Path:
    return save_pretrained(PureReasonerLM(preset("tiny")), tmp_path / "export")


def _truncate_weights(d: Path, marker: Path):
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 3])


def _wrong_shape(d: Path, marker: Path):
    cfg = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**cfg, "d_model": 32, "n_heads": 4, "n_kv_heads": 4}))


def _pickle_as_weights(d: Path, marker: Path):
    _malicious_pickle(d / WEIGHTS, marker)


def _config_not_json(d: Path, marker: Path):
    (d / CONFIG).write_text("{'d_model': 64,")


def _config_bad_value(d: Path, marker: Path):
    cfg = json.loads((d / CONFIG).read_text())
    cfg["knowledge"]["top_k"] = 1000
    (d / CONFIG).write_text(json.dumps(cfg))


def _missing_weights(d: Path, marker: Path):
    (d / WEIGHTS).unlink()


CHECKPOINT_CASES = {
    "truncated_safetensors": (_truncate_weights, r"model.safetensors is not a readable safetensors file"),
    "wrong_model_shape": (_wrong_shape, r"model.safetensors does not match its config"),
    "pickle_with_code_as_weights": (_pickle_as_weights, r"model.safetensors is not a readable safetensors file"),
    "config_not_json": (_config_not_json, r"config.json is not a valid config"),
    "config_bad_value": (_config_bad_value, r"top_k=1000 exceeds"),
    "missing_weights": (_missing_weights, r"has no model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint(exported, tmp_path, case):
    damage, match = CHECKPOINT_CASES[case]
    marker = tmp_path / "pwned"
    damage(exported, marker)
    with pytest.raises(ValueError, match=match):
        load_pretrained(exported)
    assert not marker.exists()


def test_bad_tokenizer_file(exported):
    (exported / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=r"tokenizer.json is not a readable tokenizers file"):
        load_codec(exported, 512)


# ------------------------------------------------------------------ tensors at the public API
D, E, F, T, K = 64, 4, 32, 5, 2


def _kmlp(x_TD=None, ids_TK=None, w_dtype=torch.float32):
    w1_EDF, w3_EDF = torch.randn(E, D, F, dtype=w_dtype), torch.randn(E, D, F, dtype=w_dtype)
    w2_EFD = torch.randn(E, F, D, dtype=w_dtype)
    x_TD = torch.randn(T, D) if x_TD is None else x_TD
    ids_TK = torch.randint(0, E, (T, K)) if ids_TK is None else ids_TK
    return kernels.knowledge_mlp(x_TD, ids_TK, torch.rand(T, K), w1_EDF, w3_EDF, w2_EFD)


def _lm():
    return PureReasonerLM(preset("tiny"))


# ValueError for what the code checks; torch's own RuntimeError (naming the dtype/device) for the
# MoE layer, whose forward does not check dtype/device itself (moe/layer.py, see the report).
TENSOR_CASES = {
    "lm_float_ids": (lambda: _lm()(torch.zeros(2, 4)), ValueError, r"2-D integer tensor, got torch.float32"),
    "lm_rank3_ids": (lambda: _lm()(torch.zeros(1, 2, 4, dtype=torch.long)), ValueError, r"got torch.int64 \(1, 2, 4\)"),
    "lm_rank1_ids": (lambda: _lm()(torch.zeros(4, dtype=torch.long)), ValueError, r"got torch.int64 \(4,\)"),
    "lm_too_long": (lambda: _lm()(torch.zeros(1, 4096, dtype=torch.long)), ValueError, r"4096 exceeds model.max_seq"),
    "moe_wrong_width": (lambda: _lm().moe_layers()[0](torch.randn(2, D + 1)), ValueError, r"got shape \(2, 65\)"),
    "moe_wrong_dtype": (
        lambda: _lm().moe_layers()[0](torch.randn(2, 3, D, dtype=torch.float64)),
        RuntimeError,
        r"double",
    ),
    "moe_wrong_device": (lambda: _lm().moe_layers()[0](torch.randn(2, 3, D, device="meta")), RuntimeError, r"meta"),
    "kmlp_wrong_rank": (lambda: _kmlp(x_TD=torch.randn(T, D, 1)), ValueError, r"x_TD must be 2-D .* \(5, 64, 1\)"),
    "kmlp_wrong_dtype": (lambda: _kmlp(w_dtype=torch.float64), ValueError, r"w1_EDF has dtype torch.float64"),
    "kmlp_wrong_device": (lambda: _kmlp(x_TD=torch.randn(T, D, device="meta")), ValueError, r"on cpu, x_TD on meta"),
    "kmlp_float_ids": (lambda: _kmlp(ids_TK=torch.zeros(T, K)), ValueError, r"int32 or int64, got torch.float32"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_bad_tensor(case):
    call, error, match = TENSOR_CASES[case]
    with pytest.raises(error, match=match):
        call()


def test_nan_input_is_confined_to_its_token():
    """NaN input: no error (a check would be a host sync per call), but it poisons exactly its own token,
    so a NaN loss follows and the training guard (train.on_nonfinite) catches it within the step."""
    x_TD = torch.randn(T, D)
    x_TD[1, 3] = float("nan")
    ids_TK = torch.randint(0, E, (T, K))
    assert torch.isnan(_kmlp(x_TD, ids_TK)).any(-1).tolist() == [False, True, False, False, False]
    layer = _lm().moe_layers()[0].eval()
    y_BSD, _ = layer(x_TD.view(1, T, D))
    assert torch.isnan(y_BSD[0]).any(-1).tolist() == [False, True, False, False, False]


# ------------------------------------------------------------------ the CLIs (subprocesses: a few only)
def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python *args`` on this checkout (also from another working directory), outside this process's
    one-rank group (``dist_info`` set its rendezvous variables here; a child must pick its own port)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180, cwd=cwd, env=env)


@pytest.mark.parametrize("override, message", [("model.d_model=-1", "model.d_model must be > 0, got -1"),
                                               ("+train.bogus=1", "unknown config keys ['train.bogus']")])
@pytest.mark.parametrize("where", ["default_run_dir", "hydra_run_dir"])
def test_cli_train_rejected_config_writes_nothing(tmp_path, override, message, where):
    """Neither ``runs/<name>/`` (relative to the working directory) nor a given ``hydra.run.dir`` is created."""
    run_dir = tmp_path / "elsewhere" / "run"
    extra = [f"hydra.run.dir={run_dir}"] if where == "hydra_run_dir" else []
    proc = _cli("-m", "pure_reasoner.train", "experiment=smoke", override, *extra, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_train_bad_data_writes_nothing(tmp_path):
    """Data rejected after Hydra made the run dir: the (new, still empty) run dir is removed again."""
    data, run_dir = tmp_path / "corpus.jsonl", tmp_path / "run"
    data.write_text('{"text": "some words"}\n[1, 2]\n')
    proc = _cli("-m", "pure_reasoner.train", "experiment=smoke", "data=files", f"data.files=[{data}]",
                f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and f"{data}:2: not a JSON object" in proc.stderr, proc.stderr
    assert not run_dir.exists()


def test_cli_inspect_pickle_checkpoint(exported, tmp_path):
    marker, out = tmp_path / "pwned", tmp_path / "trace.json"
    _malicious_pickle(exported / WEIGHTS, marker)
    proc = _cli("-m", "pure_reasoner.moe.inspect", "--checkpoint", str(exported), "--text", "hi", "--json", str(out))
    assert proc.returncode != 0 and "model.safetensors is not a readable safetensors file" in proc.stderr
    assert not marker.exists() and not out.exists()


def test_cli_inspect_document_over_any_limit(exported, tmp_path):
    out = tmp_path / "trace.json"
    text = "word " * 5000
    proc = _cli("-m", "pure_reasoner.moe.inspect", "--checkpoint", str(exported), "--text", text, "--json", str(out))
    assert proc.returncode != 0 and "over model.max_seq_len=128" in proc.stderr
    assert not out.exists()


def test_cli_eval_truncated_checkpoint(exported, tmp_path):
    from pure_reasoner.train.world.generator import world_config

    (exported / "world.json").write_text(json.dumps(asdict(world_config("tiny"))))
    _truncate_weights(exported, tmp_path)
    out = tmp_path / "report.json"
    proc = _cli("-m", "pure_reasoner.train.evaluation", "--checkpoint", str(exported), "--json", str(out))
    assert proc.returncode == 2 and "is not a readable safetensors file" in proc.stderr
    assert not out.exists()
