"""Reading drills that are new in every micro-batch ("freshly generated people in every batch").

``data.fresh_drills = n`` fills n of the ``train.micro_batch_size`` sequences of every micro-batch with reading
drills (``train.world.generator.drill_rows``: biographies of people generated for this micro-batch as context, no loss
on it, then QA lines about them) instead of corpus sequences. The people are drawn from (world seed, step, rank,
micro-step), so no two micro-batches share a drill, a resumed run reads exactly what the first run would have,
and 1 rank with grad_accum=2 reads what 2 ranks with grad_accum=1 read (the key is the global micro-batch index).
A name may recur in a later batch (the world's name pool is finite) but with other facts, so memorising a
drill person never pays: only reading does. ``data.counterfactual_drills`` makes a share of them about known people
with changed values instead (``train.world.counterfactual``).

A world on disk (``data.source=world``) without a generator supplies its drills as ``drills.jsonl`` instead
(``FileDrills``): rows packed once, read in a seeded order, micro-batch ``key`` taking the ``count`` sequences at
read positions ``key * count ...``; fresh until the file is used up, then read again in a new order.
"""

from __future__ import annotations

import dataclasses

import torch
from tokenizers import Tokenizer

from pure_reasoner.train.data import EOD, PackedSequences, encode_units, pack_units, read_windows, tokenize_in_context
from pure_reasoner.train.world.counterfactual import with_counterfactuals
from pure_reasoner.train.world.generator import World, drill_rows
from pure_reasoner.train.world.text import attribute_weights


class FreshDrills:
    """Packed sequences of fresh reading drills.

    Args:
        world: the training world (drill people are never among its people).
        tok: the training tokenizer.
        seq_len: S.
        questions: QA lines per drill (``drill_rows(questions=)``).
        counterfactual: share of the drills that are counterfactual drills about known people
            (``train.world.counterfactual.with_counterfactuals``); 0 leaves every drill fresh.
        weights: attribute -> weight of the attributes the drills ask (``drill_rows(weights=)``; a counterfactual
            drill changes attributes drawn by them too); None: uniform.
        distractors: people besides the asked one in each drill's context (None: the world's
            ``num_distractors``).
    """

    def __init__(self, world: World, tok: Tokenizer, seq_len: int, questions: int = 1, counterfactual: float = 0.0,
                 weights: dict[str, float] | None = None, distractors: int | None = None):
        if distractors is not None:  # the drills read the group size off the world's config
            world = dataclasses.replace(world, cfg=dataclasses.replace(world.cfg, num_distractors=distractors))
        self.world, self.tok, self.seq_len, self.questions = world, tok, seq_len, questions
        self.counterfactual, self.weights = counterfactual, attribute_weights(weights)
        self.eod = tok.token_to_id(EOD)
        for key in range(8):  # a drill too long for a sequence fails here (mostly), before training starts
            self.batch(-1 - key, 1)

    def batch(self, key: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` sequences of drills about people drawn for ``key`` (the global micro-batch index):
        (idx_nS, targets_nS), targets IGNORE_INDEX on contexts and padding."""
        units: list[tuple[list[int], list[bool]]] = []
        chunk = 0
        while True:
            step = f"{key}.{chunk}"
            rows = drill_rows(self.world, step, count, "fresh", self.questions, self.weights)
            rows = with_counterfactuals(self.world, rows, step, self.counterfactual, "fresh", self.questions,
                                        self.weights)
            units += encode_units({k: [r[k] for r in rows] for k in ("text", "context")}, self.tok, self.eod)
            try:
                stream, mask = pack_units(units, self.seq_len, self.eod)
            except ValueError as err:
                raise ValueError(f"fresh reading drill ({self.questions} questions): {err}, or lower "
                                 "data.generator_kwargs.drill_questions") from err
            if stream.numel() >= count * self.seq_len + 1:
                break
            chunk += 1
        offsets_nS1 = torch.arange(count).unsqueeze(1) * self.seq_len + torch.arange(self.seq_len + 1)
        return read_windows(stream, mask, offsets_nS1)


class FileDrills:
    """Packed sequences of a world's ``drills.jsonl`` (every row with a context), the same interface as
    ``FreshDrills``.

    Args:
        path: the drills file (``train.world.disk.read_corpus`` schema).
        tok: the training tokenizer.
        seq_len: S.
        seed: the read order's seed (``train.seed``).
    """

    def __init__(self, path, tok: Tokenizer, seq_len: int, seed: int):
        import datasets

        from pure_reasoner.train.world.disk import read_corpus

        rows = read_corpus(path, need_context=True)
        docs = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("text", "context")})
        try:
            stream, mask = tokenize_in_context(docs, tok, seq_len)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        self.packed = PackedSequences(stream, seq_len, seed, source=str(path), loss_mask=mask)

    def batch(self, key: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx_nS, targets_nS) of the ``count`` sequences micro-batch ``key`` reads."""
        return self.packed.batch(torch.arange(key * count, (key + 1) * count))
