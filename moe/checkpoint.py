"""Exported model files: one ``model.safetensors`` plus ``config.json`` in a directory.

Loading never unpickles: weights come from safetensors, the config from JSON through the typed
dataclasses (so unknown keys and bad values raise ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pure_reasoner.moe.config import KnowledgeConfig, ModelConfig
from pure_reasoner.moe.hf_files import model_config_values, write_hf_files
from pure_reasoner.moe.model import PureReasonerLM

WEIGHTS, CONFIG = "model.safetensors", "config.json"
HF_PREFIX = "model."  # what transformers' PureReasonerForCausalLM puts before PureReasonerLM's weight names
FFN_FILE = "ffn.json"  # present in exports of a baseline whose FFNs are not PureReasonerMoE (train.baselines)


def config_from_dict(values: dict) -> ModelConfig:
    """Build a ModelConfig from plain values (a config.json's: ours, or an export's for transformers, whose
    transformers keys are skipped), naming any key the schema does not have."""
    values = dict(model_config_values(values))
    knowledge = values.pop("knowledge", {})
    for cls, given in ((ModelConfig, values), (KnowledgeConfig, knowledge)):
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return ModelConfig(**values, knowledge=KnowledgeConfig(**knowledge))


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file. The result
    gets the usual umask-derived mode (mkstemp's own 0600 would surprise readers of exported files).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: PureReasonerLM, directory: str | os.PathLike, hf: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (buffers included) atomically into ``directory``.

    hf: also the files that make the directory a transformers model (``moe.hf_files``; config.json then carries
    transformers' keys too, and a tokenizer.json already there is described for AutoTokenizer).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    atomic_write(out / WEIGHTS, lambda p: save_file(state, p))
    write_text(out / CONFIG, json.dumps(dataclasses.asdict(model.cfg), indent=2))
    if hf:
        write_hf_files(out, model.cfg, write_text)
    return out


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda p: Path(p).write_text(text))


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> PureReasonerLM:
    """Load a model written by ``save_pretrained``, or by transformers' ``PureReasonerForCausalLM.save_pretrained``
    (``moe.hf``: its weight names carry the wrapper's ``model.`` prefix). Raises ValueError naming what is wrong."""
    src = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (src / name).is_file():
            raise ValueError(f"checkpoint {src} has no {name}")
    if (src / FFN_FILE).is_file():
        raise ValueError(f"checkpoint {src} is a baseline with other FFNs ({(src / FFN_FILE).read_text()}); "
                         "load it with train.baselines.load_residual_pretrained")
    try:
        cfg = config_from_dict(json.loads((src / CONFIG).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise ValueError(f"{src / CONFIG} is not a valid config: {err}") from err
    try:
        state = load_file(src / WEIGHTS, device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{src / WEIGHTS} is not a readable safetensors file: {err}") from err
    state = _without_prefix(state, HF_PREFIX)
    model = PureReasonerLM(cfg).to(map_location)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{src / WEIGHTS} does not match its config: {err}") from err
    return model


def _without_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with ``prefix`` cut from its names when every name has it (else unchanged)."""
    if state and all(name.startswith(prefix) for name in state):
        return {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    return state
