"""``lm_eval`` (0.4.13) model ``pure_reasoner``: a PureReasonerLM checkpoint behind the harness's LM interface.

    python -m pure_reasoner.train.evaluation.lm_eval_model --model pure_reasoner --model_args checkpoint=DIR \\
        --device cpu         --tasks pure_reasoner --include_path train/evaluation/lm_eval_tasks

takes exactly ``lm_eval``'s arguments: it registers the model, then runs the harness's own CLI. (lm_eval 0.4.13
has no plugin entry point for third-party models, so the stock ``lm_eval`` command finds ``pure_reasoner`` only
when a task YAML is passed by path, e.g. ``--tasks train/evaluation/lm_eval_tasks/pr_closed_book.yaml``: loading it
imports ``train/evaluation/lm_eval_tasks/world_tasks.py``, which registers the model before the model is built.)

model_args: ``checkpoint`` (required), ``ablation`` (one of ``train.evaluation.evaluate.ABLATIONS``), ``mean_reference``
(the mean ablations' stored constants, a ``.means.safetensors`` file that ``python -m pure_reasoner.train.evaluation
--json`` writes; needed by ``knowledge_mean`` and ``answer_mean``), ``world_dir`` (read by the tasks, see
``world_tasks.py``); ``batch_size`` and ``device`` come from the harness's flags. Scoring and
generation are ``train.evaluation.evaluate``'s, so the numbers agree with ``python -m pure_reasoner.train.evaluation``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pure_reasoner.train.evaluation.evaluate import (
    ABLATIONS,
    MEAN_ABLATIONS,
    greedy_generate,
    load,
    score_continuations,
    score_ids,
)
from pure_reasoner.train.evaluation.mean_reference import load_reference

log = logging.getLogger(__name__)
DEFAULT_BATCH = 16


class PureReasonerEvalLM(LM):
    """loglikelihood / loglikelihood_rolling / generate_until for a checkpoint directory."""

    def __init__(self, checkpoint: str | None = None, ablation: str = "base", batch_size: int | str = DEFAULT_BATCH,
                 device: str = "cpu", world_dir: str | None = None, max_batch_size: int | None = None,
                 mean_reference: str | None = None, **unused):
        super().__init__()
        if checkpoint is None:
            raise ValueError("pure_reasoner needs model_args checkpoint=DIR")
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {tuple(ABLATIONS)}, got {ablation!r}")
        if ablation in MEAN_ABLATIONS and mean_reference is None:
            raise ValueError(f"ablation {ablation} needs model_args mean_reference=FILE (written by "
                             "python -m pure_reasoner.train.evaluation --json)")
        if unused:
            log.warning("pure_reasoner ignores model_args %s", sorted(unused))
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but CUDA is not available: using cpu", device)
            device = "cpu"
        self.model, self.codec = load(checkpoint, device)
        self.ablation = ablation
        self.reference = load_reference(mean_reference) if mean_reference is not None else None
        # "auto" / "auto:N" (the harness's batch-size search) falls back to a fixed size.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        logprobs, greedy, truncated = score_continuations(self.model, self.codec, pairs, ablation=self.ablation,
                                                          batch_size=self.batch_size, reference=self.reference)
        if truncated:
            log.warning("%d of %d contexts were cut from the left to fit max_seq_len", truncated, len(pairs))
        return list(zip(logprobs, greedy, strict=True))

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Sum of log p(token | earlier tokens, up to max_seq_len of them) over each string. Without a BOS token
        the first token has no context: it conditions the rest and is not scored."""
        windows, owners = [], []
        for i, req in enumerate(requests):
            ids = self.codec.encode(req.args[0])
            if len(ids) >= 2:
                pieces = get_rolling_token_windows(token_list=ids[1:], prefix_token=ids[0],
                                                   max_seq_len=self.model.cfg.max_seq_len, context_len=1)
                for window in map(make_disjoint_window, pieces):
                    windows.append(window)
                    owners.append(i)
        logprobs, _, _ = score_ids(self.model, windows, ablation=self.ablation, batch_size=self.batch_size,
                                   reference=self.reference)
        out = [0.0] * len(requests)
        for i, logprob in zip(owners, logprobs, strict=True):
            out[i] += logprob
        return out

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1])
            if kwargs.get("do_sample"):
                raise ValueError("pure_reasoner generates greedily; got do_sample=True")
            until = kwargs.get("until") or []
            groups.setdefault((tuple([until] if isinstance(until, str) else until),
                               int(kwargs.get("max_gen_toks", 32))), []).append(i)
        for (until, max_tokens), rows in groups.items():
            texts = greedy_generate(self.model, self.codec, [requests[i].args[0] for i in rows], max_tokens,
                                    stop=until, ablation=self.ablation, batch_size=self.batch_size,
                                    reference=self.reference)
            for i, text in zip(rows, texts, strict=True):
                out[i] = text
        return out


if __name__ != "__main__":  # run as a script, the canonical module (imported below) registers it
    register_model("pure_reasoner")(PureReasonerEvalLM)


def main(argv: Sequence[str] | None = None) -> None:
    """Register ``pure_reasoner`` and run lm_eval's CLI with ``argv``."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    from pure_reasoner.train.evaluation.lm_eval_model import main as registered_main

    registered_main()
