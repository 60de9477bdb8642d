"""The constants of the mean ablations ``knowledge_mean`` and ``answer_mean`` of ``train.evaluation.evaluate``.

Shape legend: L MoE layers, D model dim.

A mean ablation gives each consulting token, in every MoE layer, a constant instead of its own knowledge-path
output (``moe.interventions.mean_ablation``): what the experts add whatever the person (a "key" the always-on path
may have learned to need) survives, what they store about particular people does not. The constant of layer l is
the mean of that layer's knowledge output over a fixed reference set of the world, recorded once per model on the
un-ablated model (``reference_means``), so a score never depends on the batch it was computed in, on padding or
on later positions. It is stored with the eval results: ``save_reference`` writes it (safetensors) next to the
report, ``describe`` puts its token counts, norms and hash in the report, ``load_reference`` reads it back.

The reference set (``reference_pairs``), in the formats the eval splits score, is never an eval example:
- half closed-book questions (``Q: ...\\nA:`` + `` answer.``) about the world's QA people, whose QA pairs and
  biographies are training text: the experts were trained to hold these facts, so averaged over ~100 people
  their outputs keep the person-independent part only. The closed-book, two-hop and comparison splits ask about
  the held-out people instead; counterfactual examples are about any known person, so a few share a person
  (not a sequence, nor the scored value: that comes from their context) with the reference.
- half open-book reading drills about fresh people (never in the world; the open-book splits use unseen ones),
  so the tokens of contexts and of answers read from them are represented too.
``knowledge_LD`` is the mean over every consulting token of the set (padding excluded), ``answer_LD`` over the
consulting positions that predict an answer (as ``answer_mean`` replaces them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch

from pure_reasoner.moe.interventions import record_knowledge_means
from pure_reasoner.train.evaluation.batches import encode_pairs, padded_batches
from pure_reasoner.train.world.splits import REFERENCE_SEQUENCES, reference_pairs
from pure_reasoner.train.world.types import World

REFERENCE_SET = ("closed-book questions about the world's QA people (their QA pairs are training text) and "
                 "open-book reading drills about fresh people, half each; clean model, padding excluded")


class MeanReference(NamedTuple):
    """knowledge_LD: [L, D] mean knowledge output over the reference set's consulting tokens (knowledge_mean);
    answer_LD: [L, D] over its consulting answer positions (answer_mean); knowledge_tokens_L, answer_tokens_L:
    [L] how many tokens each mean is over; sequences: size of the reference set."""

    knowledge_LD: torch.Tensor
    answer_LD: torch.Tensor
    knowledge_tokens_L: torch.Tensor
    answer_tokens_L: torch.Tensor
    sequences: int


@torch.no_grad()
def reference_means(model, codec, world: World | list[tuple[str, str]], count: int = REFERENCE_SEQUENCES,
                    batch_size: int = 16) -> MeanReference:
    """Record the reference means of ``model`` (eval mode) on ``reference_pairs(world, count)`` (or on the given
    (prompt, continuation) pairs: a world directory's reference set), encoded with ``codec``
    (``train.evaluation.evaluate.Codec``) and cut to the model's ``max_seq_len`` like the scored pairs."""
    given = reference_pairs(world, count) if isinstance(world, World) else world
    pairs = [(codec.encode(c), codec.encode(t)) for c, t in given]
    encoded, _ = encode_pairs(pairs, model.cfg.max_seq_len + 1)
    device = next(model.parameters()).device
    with record_knowledge_means(model) as every, record_knowledge_means(model) as answers:
        for batch in padded_batches(encoded, batch_size):
            every.mask_BS, answers.mask_BS = batch.valid_BS.to(device), batch.answer_BS.to(device)
            model(batch.idx_BS.to(device))
    return MeanReference(every.means_LD().cpu(), answers.means_LD().cpu(), every.counts_L.cpu(),
                         answers.counts_L.cpu(), len(pairs))


def _digest(ref: MeanReference) -> str:
    data = torch.cat([ref.knowledge_LD.float().flatten(), ref.answer_LD.float().flatten()]).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def describe(ref: MeanReference) -> dict:
    """What the report says of the reference: the set, its size, per-layer token counts and norms, and the
    sha256 of the fp32 means (``knowledge_LD`` then ``answer_LD``), which identifies the stored file."""
    return {"set": REFERENCE_SET, "sequences": ref.sequences,
            "knowledge_tokens": ref.knowledge_tokens_L.tolist(), "answer_tokens": ref.answer_tokens_L.tolist(),
            "knowledge_norm": ref.knowledge_LD.norm(dim=1).tolist(), "answer_norm": ref.answer_LD.norm(dim=1).tolist(),
            "sha256": _digest(ref)}


def save_reference(ref: MeanReference, path: str | Path) -> Path:
    """Write the reference to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(ref, name).contiguous() for name in MeanReference._fields if name != "sequences"}
    save_file(tensors, str(path), metadata={"sequences": str(ref.sequences), "set": REFERENCE_SET})
    return path


def load_reference(path: str | Path) -> MeanReference:
    """Read a reference written by ``save_reference``. Raises ValueError naming the file when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            sequences = int((f.metadata() or {})["sequences"])
        ref = MeanReference(**tensors, sequences=sequences)
    except Exception as err:  # safetensors raises its own types; a missing name is a TypeError
        raise ValueError(f"{path} is not a mean-ablation reference written by save_reference: {err}") from err
    if ref.knowledge_LD.shape != ref.answer_LD.shape or ref.knowledge_LD.dim() != 2:
        raise ValueError(f"{path}: knowledge_LD {tuple(ref.knowledge_LD.shape)} and answer_LD "
                         f"{tuple(ref.answer_LD.shape)} must be the same [L, D]")
    return ref
