"""The Hugging Face side of an exported model directory, written without importing ``transformers``.

An export (``train.export``, ``moe.checkpoint.save_pretrained(..., hf=True)``) is one directory that both
stacks read:

    config.json                 our ModelConfig fields, plus the keys transformers reads (model_type,
                                architectures, auto_map, dtype, knowledge_off, token ids)
    model.safetensors           PureReasonerLM's state dict (buffers included), keys as in our stack
    tokenizer.json              a ``tokenizers`` file (written here as byte ids when the run had none)
    tokenizer_config.json       PreTrainedTokenizerFast with the tokenizer's special tokens
    configuration_pure_reasoner.py, modeling_pure_reasoner.py
                                two-line files importing ``pure_reasoner.moe.hf``: the remote-code route

``pure_reasoner.moe.hf`` holds the transformers classes; importing it registers them with the auto classes (the route
without remote code). See docs/huggingface.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pure_reasoner.moe.config import ModelConfig

MODEL_TYPE = "pure_reasoner"
ARCHITECTURE = "PureReasonerForCausalLM"
CONFIG_MODULE, MODELING_MODULE = "configuration_pure_reasoner", "modeling_pure_reasoner"
TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))

_REMOTE_CODE = {
    CONFIG_MODULE: '"""PureReasonerConfig from the installed pure-reasoner package."""\n\n'
                   "from pure_reasoner.moe.hf import PureReasonerConfig  # noqa: F401\n",
    MODELING_MODULE: '"""PureReasonerForCausalLM from the installed pure-reasoner package."""\n\n'
                     "from pure_reasoner.moe.hf import PureReasonerForCausalLM  # noqa: F401\n",
}


def is_hf_config(values: dict) -> bool:
    """Whether a config.json's values were written for transformers (they carry our model_type)."""
    return values.get("model_type") == MODEL_TYPE


def model_config_values(values: dict) -> dict:
    """The ModelConfig fields of a config.json: all of it for ours, the ModelConfig keys of a transformers one
    (the other keys are transformers', which validates them when it loads the directory)."""
    if not is_hf_config(values):
        return values
    return {k: v for k, v in values.items() if k in MODEL_FIELDS}


def hf_config_values(cfg: ModelConfig, special: dict[str, int | None], knowledge_off: bool = False) -> dict:
    """config.json of an export: ``cfg`` plus what transformers reads.

    Args:
        special: ``eos_token_id``, ``pad_token_id``, ``bos_token_id`` (``tokenizer_special_ids``).
        knowledge_off: the default of ``PureReasonerForCausalLM.forward``'s knowledge ablation.
    """
    return {
        **dataclasses.asdict(cfg),
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": {"AutoConfig": f"{CONFIG_MODULE}.PureReasonerConfig",
                     "AutoModelForCausalLM": f"{MODELING_MODULE}.{ARCHITECTURE}"},
        "knowledge_off": knowledge_off,
        "dtype": "float32",  # the exported weights' dtype: from_pretrained's dtype="auto" reads it
        "use_cache": False,  # no KV cache: generate() re-reads the whole context each step
        "tie_word_embeddings": cfg.tie_embeddings,
        **special,
    }


def byte_tokenizer_json() -> str:
    """A ``tokenizers`` file whose ids are UTF-8 bytes (id = byte value), as ``train.evaluation.evaluate.Codec()``
    encodes without a tokenizer file: byte-level pre-tokenizer and decoder, one vocabulary entry per byte, no
    merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character of each byte (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_special_ids(tokenizer_json: str) -> tuple[dict[str, int | None], dict[str, str]]:
    """(token ids for config.json, token strings for tokenizer_config.json) of a tokenizers file.

    The last added special token is the end of a document (``train.data.EOD``): eos, and pad for batching.
    Without one (byte ids), byte 0 (NUL, which text does not contain) stands in for all three: pad (what
    ``train.evaluation.evaluate`` pads with), bos (nothing adds it to a text; lm_eval conditions an empty context on
    it) and eos (lm_eval's generation needs one).
    """
    data = json.loads(tokenizer_json)
    specials = [t for t in data.get("added_tokens", []) if t.get("special")]
    if specials:
        eos = specials[-1]
        return ({"eos_token_id": eos["id"], "pad_token_id": eos["id"], "bos_token_id": None},
                {"eos_token": eos["content"], "pad_token": eos["content"]})
    pad = next(token for token, i in data["model"]["vocab"].items() if i == 0)
    return {"eos_token_id": 0, "pad_token_id": 0, "bos_token_id": 0}, {"pad_token": pad, "bos_token": pad,
                                                                        "eos_token": pad}


def write_hf_files(directory: Path, cfg: ModelConfig, write) -> None:
    """Tokenizer files, config.json and the remote-code files of an export; ``write(path, text)`` writes one
    file atomically (``moe.checkpoint``). A missing tokenizer.json becomes the byte tokenizer (needs vocab_size
    >= 256)."""
    path = directory / TOKENIZER
    if path.is_file():
        tokenizer_json = path.read_text()
    elif cfg.vocab_size >= 256:
        tokenizer_json = byte_tokenizer_json()
        write(path, tokenizer_json)
    else:
        raise ValueError(f"{directory} has no {TOKENIZER} and vocab_size={cfg.vocab_size} < 256 byte ids")
    ids, tokens = tokenizer_special_ids(tokenizer_json)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                        "clean_up_tokenization_spaces": False, "add_bos_token": False, **tokens}
    write(directory / TOKENIZER_CONFIG, json.dumps(tokenizer_config, indent=2))
    write(directory / "config.json", json.dumps(hf_config_values(cfg, ids), indent=2))
    for module, text in _REMOTE_CODE.items():
        write(directory / f"{module}.py", text)
