"""One training run: data, model, DeepSpeed engine, resume, the step loop, checkpoints, export.

Shape legend: B micro-batch, S sequence length, L MoE layers, E knowledge experts.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from pure_reasoner.kernels import engines
from pure_reasoner.moe import MoEStats, flops, interventions
from pure_reasoner.train import data, distill, ds_checkpoint, init_from, objectives, plain_dp
from pure_reasoner.train.build_model import build_model
from pure_reasoner.train.config import FROZEN_ROUTING, UPDATE_GENERATOR, WORLD_GENERATOR, Config, current_generator
from pure_reasoner.train.dist import DistInfo, all_reduce_sum, barrier, init_distributed, rank_zero_first, set_threads
from pure_reasoner.train.engine import build_engine, compute_dtype
from pure_reasoner.train.guards import collapse_warnings
from pure_reasoner.train.metrics import MetricsLogger, StepMetrics
from pure_reasoner.train.relocation import Relocation
from pure_reasoner.train.slots import mask_gradients
from pure_reasoner.train.trainable import call_always_on_detached, knowledge_parameter_names, set_trainable
from pure_reasoner.train.world.drills import FileDrills, FreshDrills
from pure_reasoner.train.world.generator import build_world, corpus_world_config, save_world_config
from pure_reasoner.train.world.prior import ValuePrior

log = logging.getLogger("train")


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. a non-finite loss); the last checkpoint is intact."""


@dataclass
class Summary:
    """What a run did; tokens_per_s and mfu are medians over the steps this process ran."""

    steps: int
    final_loss: float
    tokens_per_s: float
    mfu: float
    wall_s: float
    resumed_from: str | None
    losses: list[float]


@dataclass
class TrainData:
    """Where each micro-batch comes from: corpus sequences, plus ``data.fresh_drills`` drill sequences."""

    packed: data.PackedSequences
    drills: FreshDrills | None
    eod_id: int | None = None  # the end-of-document token: documents for data.doc_mask
    prior: ValuePrior | None = None  # objective.uses_prior: the world's prior over value tokens

    def micro_batch(self, cfg: Config, info: DistInfo, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The model's inputs for micro-step ``micro`` of ``step`` on this rank: idx_BS, targets_BS and the
        closed-book tokens (``data.closed_book_tokens``; drills have none) as reasoning_frozen_BS (the mask of
        ``moe.interventions.gradient_routing``) with ``objective.route_knowledge`` and as consult_target_BS (the
        targets of ``objectives.consult_supervision``) with ``model.knowledge.consult_loss_coef`` (with
        ``objective.route_tokens`` / ``consult_targets`` ``=recall`` only those whose target is a fact value,
        ``data.recall_tokens``; with ``consult_targets=recall_keys`` those and the closed-book tokens of names,
        ``data.key_tokens``); with the knowledge-off pass (``objective.forget_weight`` / ``read_weight``)
        also its masks: forget_BS (those recall tokens) and read_BS (every token outside closed-book rows; with
        ``objective.read_rows=drills`` every token of the drill sequences only); with
        ``objective.anchor_weight`` those recall tokens (with ``objective.anchor_rows=marked``, those of the rows
        marked for it; with ``objective.anchor_skip``, not those of the spans it matches) as anchor_BS; with a
        forget pass scored against the world's prior the prior node of each target (-1 for none) as
        prior_node_BS."""
        t, fresh = cfg.train, cfg.data.fresh_drills
        positions = data.micro_batch_positions(step, micro, info.rank, t.micro_batch_size - fresh, t.grad_accum,
                                               info.world_size)
        idx_BS, targets_BS = self.packed.batch(positions)
        closed_BS = self.packed.closed(positions) if cfg.uses_closed_book_tokens else None
        recall_BS = self.packed.recall(positions) if cfg.uses_recall_tokens else None
        prior_BS = self.packed.prior_nodes(positions) if self.prior is not None else None
        anchor_BS = self.packed.anchor(positions) if cfg.objective.anchors_subset else recall_BS
        frozen_BS = recall_BS if cfg.routes_recall_tokens else closed_BS
        consult_BS = recall_BS if cfg.consults_recall_tokens else closed_BS
        if cfg.consults_key_tokens:
            consult_BS = consult_BS | self.packed.keys(positions)
        if self.drills is not None:
            key = (step * info.world_size + info.rank) * t.grad_accum + micro  # global micro-batch index
            drill_idx, drill_targets = self.drills.batch(key, fresh)
            idx_BS, targets_BS = torch.cat([idx_BS, drill_idx]), torch.cat([targets_BS, drill_targets])
            if closed_BS is not None:
                none_BS = torch.zeros_like(drill_idx, dtype=torch.bool)
                frozen_BS, consult_BS = torch.cat([frozen_BS, none_BS]), torch.cat([consult_BS, none_BS])
                closed_BS = torch.cat([closed_BS, none_BS])
                recall_BS = None if recall_BS is None else torch.cat([recall_BS, none_BS])
                anchor_BS = None if anchor_BS is None else torch.cat([anchor_BS, none_BS])
                prior_BS = None if prior_BS is None else torch.cat([prior_BS, torch.full_like(drill_idx, -1)])
        batch = {"idx_BS": idx_BS, "targets_BS": targets_BS}
        if cfg.data.doc_mask:
            batch["doc_ids_BS"] = data.doc_ids(idx_BS, self.eod_id)
        if cfg.objective.knowledge_off_pass:
            batch["read_BS"] = ~closed_BS
            if cfg.objective.read_rows == "drills":  # the last `fresh` sequences are the drills
                batch["read_BS"][: idx_BS.shape[0] - fresh] = False
            batch["forget_BS"] = recall_BS if recall_BS is not None else torch.zeros_like(closed_BS)
            if prior_BS is not None:
                batch["prior_node_BS"] = prior_BS
        if cfg.objective.anchor_weight > 0:
            batch["anchor_BS"] = anchor_BS
        if cfg.objective.route_knowledge:
            batch["reasoning_frozen_BS"] = frozen_BS
        if cfg.model.knowledge.consult_loss_coef > 0:
            batch["consult_target_BS"] = consult_BS
        return batch


def prepare_data(cfg: Config, run_dir: Path, info: DistInfo) -> tuple[TrainData, Tokenizer]:
    """Load, tokenize and pack the corpus. Rank 0 trains (or reuses) and saves the tokenizer first."""
    path = run_dir / data.TOKENIZER
    with rank_zero_first(info.rank):
        marked = cfg.objective.anchors_marked_rows
        skip = cfg.objective.anchor_skip
        docs = data.load_documents(cfg.data, recall=cfg.uses_recall_tokens, anchor=marked, keys=cfg.consults_key_tokens)
        if skip is not None:
            docs = data.with_skipped_spans(docs, skip)
        if cfg.consults_key_tokens and cfg.objective.consult_targets == "recall_key_tails":
            docs = data.with_key_tails(docs)
        if data.num_chars(docs) == 0:
            raise ValueError(f"data source {cfg.data.source!r} {cfg.data.files or cfg.data.generator or ''} is empty")
        if path.exists():
            tok = Tokenizer.from_file(str(path))
        else:
            tok = data.train_tokenizer(docs, cfg.data.tokenizer, cfg.model.vocab_size)
        if tok.get_vocab_size() > cfg.model.vocab_size:
            raise ValueError(
                f"{path}: tokenizer has {tok.get_vocab_size()} ids, model.vocab_size={cfg.model.vocab_size}"
            )
        if not cfg.data.with_context:
            stream, loss_mask = data.tokenize(docs, tok), None
        else:
            stream, loss_mask = data.tokenize_in_context(docs, tok, cfg.data.seq_len)
        closed = recall = anchor = keys = None
        if cfg.uses_closed_book_tokens:
            closed = data.closed_book_tokens(stream, loss_mask, tok.token_to_id(data.EOD))
        columns = [name for name, used in (("recall", cfg.uses_recall_tokens), ("keys", cfg.consults_key_tokens),
                                           ("anchor_skip", skip is not None)) if used]
        codes = data.span_codes(docs, tok, cfg.data.seq_len, columns) if columns else {}
        if "recall" in codes:  # values in closed-book rows (and those of rows marked for the anchor)
            recall = (codes["recall"] > 0) & closed
            anchor = (codes["recall"] == 2) & closed if marked else None
            if skip is not None:  # the anchor's tokens less those of the spans it skips
                anchor = (recall if anchor is None else anchor) & (codes["anchor_skip"] == 0)
        if "keys" in codes:  # names in closed-book rows
            keys = (codes["keys"] > 0) & closed
        prior = prior_nodes = None
        if cfg.objective.uses_prior:
            world = build_world(corpus_world_config(**cfg.data.generator_kwargs))
            prior = ValuePrior.build(world, tok)
            prior_nodes = prior.stream_nodes(stream, recall)
            covered = int((prior_nodes >= 0).sum()) / max(int(recall.sum()), 1)
            log.info(f"world prior: {len(prior.children)} nodes, covering {covered:.1%} of the recall tokens")
        packed = data.PackedSequences(
            stream, cfg.data.seq_len, cfg.train.seed, source=f"data source {cfg.data.source!r}", loss_mask=loss_mask,
            closed=closed, recall=recall, anchor=anchor, keys=keys, prior_nodes=prior_nodes,
        )
        if info.rank == 0 and not path.exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            data.save_tokenizer(tok, path)
        if info.rank == 0 and cfg.data.generator == WORLD_GENERATOR:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_world_config(corpus_world_config(**cfg.data.generator_kwargs), run_dir)
        if info.rank == 0 and cfg.data.generator == UPDATE_GENERATOR:
            from pure_reasoner.train.world_update import save_update_files

            save_update_files(cfg.data.generator_kwargs, run_dir)  # world.json (the base world) + update.json
    drills = None
    if cfg.data.fresh_drills:
        drills = _drill_source(cfg, tok)
    return TrainData(packed, drills, tok.token_to_id(data.EOD), prior), tok


def _drill_source(cfg: Config, tok: Tokenizer) -> FreshDrills | FileDrills:
    """Fresh reading drills: of the world generator, or of a world on disk (its generator, else its drills file)."""
    counterfactual, weights = cfg.data.counterfactual_drills, dict(cfg.data.drill_attribute_weights)
    distractors = cfg.data.drill_distractors
    if cfg.data.source != "world":
        world = build_world(corpus_world_config(**cfg.data.generator_kwargs))
        return FreshDrills(world, tok, cfg.data.seq_len, cfg.data.generator_kwargs.get("drill_questions", 1),
                           counterfactual, weights, distractors)
    from pure_reasoner.train.world.disk import DRILLS, MANIFEST, load_world

    disk = load_world(cfg.data.path)
    if disk.generated is not None:
        return FreshDrills(disk.generated, tok, cfg.data.seq_len, disk.drill_questions, counterfactual, weights,
                           distractors)
    if distractors is not None:
        raise ValueError(f"data.drill_distractors={distractors} needs a 'generator' in the {MANIFEST} of world "
                         f"{disk.path}: its {DRILLS} rows are fixed")
    if counterfactual:
        raise ValueError(f"data.counterfactual_drills={counterfactual} needs the known people of world {disk.path}: "
                         f"a 'generator' in its {MANIFEST} ({DRILLS} rows cannot be made counterfactual)")
    if weights:
        raise ValueError(f"data.drill_attribute_weights={weights} needs a 'generator' in the {MANIFEST} of world "
                         f"{disk.path}: its {DRILLS} rows are fixed")
    if not (disk.path / DRILLS).is_file():
        raise ValueError(f"data.fresh_drills={cfg.data.fresh_drills} needs drill material in world {disk.path}: a "
                         f"{DRILLS} file (rows with a context) or a 'generator' in its {MANIFEST}")
    return FileDrills(disk.path / DRILLS, tok, cfg.data.seq_len, cfg.train.seed)


def _check_compatible(state: dict, cfg: Config, world_size: int) -> None:
    """A checkpoint resumes only the run that wrote it: same model, data, seed, batch layout, world size."""
    now, saved = _identity(cfg, world_size), dict(state["identity"])
    if isinstance(saved.get("data"), dict):
        saved["data"] = {**saved["data"], "generator": current_generator(saved["data"].get("generator"))}
    diffs = [k for k in now if saved.get(k) != now[k]]
    if diffs:
        raise ValueError(f"checkpoint of step {state['step']} was written with different {diffs}; use a new name=")


def _identity(cfg: Config, world_size: int) -> dict:
    t = cfg.train
    return {
        "model": asdict(cfg.model),
        "ffn": cfg.ffn,
        "data": asdict(cfg.data),
        "seed": t.seed,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "ep_size": t.ep_size,
        "world_size": world_size,
        "objective": asdict(cfg.objective),
    }


class StepStats:
    """One step's sums over its micro-batches (loss parts, non-finite losses, each MoE layer's routing counts) and
    each layer's router-input samples in micro-batch order, kept on the device until ``reduce``."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu"):
        # loss, ce, aux, knowledge-off pass, non-finite losses, routed rows past the saved-activation bound
        self.sums_6 = torch.zeros(6, device=device)
        self.consult_L = torch.zeros(num_layers, device=device)
        self.load_LE = torch.zeros(num_layers, num_experts, device=device)
        self.router_inputs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.micro_batches = self.tokens = self.slots = 0
        self.host: list[float] = []  # sums_6, consult_L, load_LE (flattened), read back once by ``reduce``
        self.grad_norm = math.nan

    def add(self, loss: torch.Tensor, aux: torch.Tensor, off: torch.Tensor, stats: list[MoEStats]) -> None:
        """loss: the total; aux: the MoE auxiliary part of it; off: the knowledge-off pass's part (0 without)."""
        loss, aux, off = (t.detach().float().to(self.sums_6.device) for t in (loss, aux, off))
        overflow = sum((s.overflow_rows.float() for s in stats if s.overflow_rows is not None), loss.new_zeros(()))
        self.sums_6 += torch.stack([loss, loss - aux - off, aux, off, (~torch.isfinite(loss)).float(), overflow])
        for i, s in enumerate(stats):
            self.consult_L[i] += s.consulting_tokens.float()
            self.load_LE[i] += s.expert_load_E.float()
            if s.router_inputs_ND is not None:
                self.router_inputs[i].append(s.router_inputs_ND)
        self.micro_batches += 1
        if stats:
            self.tokens += stats[0].num_tokens
            self.slots += stats[0].num_slots

    def reduce(self, info: DistInfo, grad_norm: torch.Tensor | float | None = None) -> None:
        """Sum over ranks in one collective (router-input samples concatenated over ranks), then read the sums
        back to the host in one transfer, together with the step's gradient norm (DeepSpeed's, the same on every
        rank): every rank applies the same controller update, and the step reads nothing else back."""
        num_layers, num_experts = self.load_LE.shape
        flat = torch.cat([self.sums_6, self.consult_L, self.load_LE.flatten()])
        # In global micro-batch order (rank-major), so 2 ranks x 1 micro-batch sample what 1 rank x 2 does.
        samples = [torch.cat(per_micro) for per_micro in self.router_inputs if per_micro]
        sample_LND = torch.stack(samples) if samples and len(samples) == num_layers else None
        if sample_LND is not None and info.world_size > 1:
            # Each rank fills its own slot: a sum of the slots is the concatenation over ranks.
            slots_WLND = sample_LND.new_zeros(info.world_size, *sample_LND.shape)
            slots_WLND[info.rank] = sample_LND
            flat = torch.cat([flat, slots_WLND.flatten()])
        all_reduce_sum(flat)
        counts = flat[: flat.numel() - (0 if sample_LND is None or info.world_size == 1 else sample_LND.numel()
                                          * info.world_size)]
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(math.nan)
        *self.host, self.grad_norm = torch.cat([counts, norm.reshape(1).to(counts)]).tolist()  # the one transfer
        if not isinstance(grad_norm, torch.Tensor):
            self.grad_norm = math.nan if grad_norm is None else float(grad_norm)
        self.sums_6, rest = counts[:6], counts[6:]
        self.consult_L, self.load_LE = rest[:num_layers], rest[num_layers:].view(num_layers, num_experts)
        if sample_LND is not None and info.world_size > 1:
            sample_LND = flat[counts.numel() :].view(info.world_size, *sample_LND.shape).transpose(0, 1).flatten(1, 2)
        self.router_inputs = [[] for _ in range(num_layers)] if sample_LND is None else [[x] for x in sample_LND]
        self.micro_batches *= info.world_size
        self.tokens *= info.world_size  # every rank runs the same shapes
        self.slots *= info.world_size

    @property
    def host_sums(self) -> list[float]:
        """loss, ce, aux, knowledge-off pass, non-finite losses, overflow rows: summed over micro-batches and ranks
        (host)."""
        return self.host[:6]

    def moe_stats(self, on_host: bool = False) -> list[MoEStats]:
        """Per-layer MoEStats of the whole (reduced) step: on the device for the controllers, or (``on_host``)
        built from the host copy for the metrics and ``moe.flops``."""
        num_layers, num_experts = self.load_LE.shape
        consult_L, load_LE = self.consult_L, self.load_LE
        if on_host:
            host = torch.tensor(self.host[6:])
            consult_L, load_LE = host[:num_layers], host[num_layers:].view(num_layers, num_experts)
        zero = torch.zeros(())
        return [
            MoEStats(zero, zero, zero, load_LE[i], consult_L[i], self.tokens, self.slots,
                     router_inputs_ND=None if on_host or not self.router_inputs[i] else self.router_inputs[i][0])
            for i in range(num_layers)
        ]


def _resume(engine, cfg: Config, run_dir: Path, info: DistInfo) -> tuple[int, str | None]:
    found = ds_checkpoint.latest(run_dir)
    if found is None:
        return 0, None
    tag, state = found
    if not cfg.train.resume:
        raise ValueError(f"{run_dir} already holds checkpoint {tag}; set train.resume=true or choose a new name=")
    _check_compatible(state, cfg, info.world_size)
    ds_checkpoint.load(engine, run_dir, tag, info)
    return int(state["step"]), tag


def _choose_gemm_engines(override: str, rank: int) -> engines.EngineChoice:
    """This machine's GEMM engines, chosen before any step is timed: measured by rank 0 (a fraction of a
    second, then cached per machine), read from the cache by the others; or the config's override."""
    if override != "auto":
        os.environ[engines.ENV_OVERRIDE] = override  # the channel the kernels read (kernels.engines.current)
    with rank_zero_first(rank):
        choice = engines.current()
    log.info("GEMM engines (%s): %s", choice.source, {c: getattr(choice, c) for c in engines.CLASSES})
    return choice


def run(cfg: Config, run_dir: Path, resolved_config: str, grad_masks: dict[str, torch.Tensor] | None = None) -> Summary:
    """Train ``cfg`` in ``run_dir`` (resuming from its latest checkpoint). Returns a Summary on every rank.

    ``grad_masks``: ``{parameter name: mask}`` (``train.slots.mask_gradients``): only those parameters train, their
    gradients multiplied by the masks (the slot-selected knowledge update); every rank passes the same.
    """
    start_time = time.perf_counter()
    info = init_distributed(cfg.train.collective_timeout_s)
    threads = set_threads(info, cfg.train.threads)
    _choose_gemm_engines(cfg.train.gemm_engine, info.rank)
    datasets.disable_progress_bars()
    log.info("process group ready after %.1f s", time.perf_counter() - start_time)
    with rank_zero_first(info.rank):
        teacher = distill.load_teacher(cfg, run_dir, info.rank)  # before the tokenizer: the student uses the teacher's
        source = None
        if cfg.train.init_from is not None:
            source = init_from.check_source(cfg.train.init_from, cfg.model, cfg.train.ep_size)
            init_from.adopt_tokenizer(Path(cfg.train.init_from), run_dir, info.rank, "train.init_from")
    train_data, _ = prepare_data(cfg, run_dir, info)  # bad input fails here, before anything else is written
    log.info("data ready after %.1f s", time.perf_counter() - start_time)
    from pure_reasoner.train.export import EXPORT, EXPORT_TMP, export_from_engine

    if info.rank == 0:
        ds_checkpoint.remove_partial(run_dir)
        shutil.rmtree(run_dir / EXPORT_TMP, ignore_errors=True)  # an export cut short by a kill
        ds_checkpoint._write_atomic(run_dir / "config.yaml", resolved_config)
    model = build_model(cfg, ep_rank=info.rank % cfg.train.ep_size)
    if source is not None:  # a resume below overwrites these weights with the run's own
        init_from.init_weights(model, source)
    set_trainable(model, cfg.train.trainable)  # before the engine: only trainable parameters reach the optimizer
    if grad_masks is not None:
        mask_gradients(model, grad_masks)
    engine, scheduler = build_engine(cfg, model, info.world_size)
    log.info("engine ready after %.1f s", time.perf_counter() - start_time)
    start_step, resumed = _resume(engine, cfg, run_dir, info)
    relocation = Relocation(cfg, run_dir)
    if relocation.resumes_past(start_step):
        teacher = relocation.resume(engine, info)
    # Read by every rank before the barrier below, so all agree even once rank 0 starts writing it.
    exported = (run_dir / EXPORT).is_dir()
    if resumed is None:
        # DeepSpeed's WarmupCosineLR starts at iteration -1 and then 0, both at lr 0: skip one of the two.
        scheduler.step()
    barrier()
    peak = all_reduce_sum(torch.tensor([flops.measure_matmul_peak(compute_dtype(cfg))], dtype=torch.float64)).item()
    log.info(
        "rank %d/%d, %d threads, %d sequences of %d tokens, peak %.1f GFLOP/s, %s",
        info.rank,
        info.world_size,
        threads,
        train_data.packed.num_sequences,
        cfg.data.seq_len,
        peak / 1e9,
        f"resuming from {resumed}" if resumed else (f"starting from {cfg.train.init_from}" if cfg.train.init_from
                                                    else "from scratch"),
    )
    logger = MetricsLogger(run_dir, start_step) if info.rank == 0 else None
    try:
        losses, steps = _train_steps(cfg, engine, train_data, info, run_dir, start_step, peak, logger, teacher,
                                     relocation)
    finally:
        if logger is not None:
            logger.close()
    exportable = cfg.ffn == "pure_reasoner" or (cfg.train.ep_size == 1 and cfg.deepspeed.precision == "fp32")
    if cfg.train.export and exportable and (start_step < cfg.train.max_steps or not exported):
        export_from_engine(engine, cfg, run_dir, info, train_data=train_data)
    return Summary(
        steps=cfg.train.max_steps,
        final_loss=losses[-1] if losses else math.nan,
        tokens_per_s=statistics.median(m.tokens_per_s for m in steps) if steps else math.nan,
        mfu=statistics.median(m.mfu for m in steps) if steps else math.nan,
        wall_s=time.perf_counter() - start_time,
        resumed_from=resumed,
        losses=losses,
    )


def _one_step(
    cfg: Config, engine, train_data: TrainData, info: DistInfo, run_dir: Path, step: int, teacher=None,
    knowledge: set[str] | None = None,
) -> StepStats:
    """Forward/backward every micro-batch of ``step`` and let DeepSpeed step; returns the reduced stats.

    With ``objective.kind=distill`` the loss is ``distill.distill_forward``'s; ``objective.anchor_weight`` adds
    ``distill.anchor_loss``; with ``objective.always_on_grad=ablated`` the knowledge-on pass detaches every parameter
    not in ``knowledge`` (``knowledge_parameter_names``, named once per run)."""
    t = cfg.train
    acc = StepStats(len(engine.module.moe_layers()), cfg.model.knowledge.num_experts, info.device)
    knowledge = knowledge if cfg.objective.always_on_grad == "ablated" else None
    for micro in range(t.grad_accum):
        batch = {k: v.to(info.device) for k, v in train_data.micro_batch(cfg, info, step, micro).items()}
        forget_BS, read_BS = batch.pop("forget_BS", None), batch.pop("read_BS", None)
        prior_BS = batch.pop("prior_node_BS", None)
        anchor_BS = batch.pop("anchor_BS", None)
        frozen_BS, consult_BS = batch.pop("reasoning_frozen_BS", None), batch.pop("consult_target_BS", None)
        if cfg.objective.kind == "distill":
            out = distill.distill_forward(engine, teacher, batch["idx_BS"], batch["targets_BS"], cfg.objective)
        else:
            with nullcontext() if frozen_BS is None else interventions.gradient_routing(engine.module, frozen_BS):
                # always_on_grad=ablated: this pass trains only the knowledge path (the forget pass trains the rest)
                out = (engine(**batch) if knowledge is None
                       else call_always_on_detached(engine.module, knowledge, **batch))
            if consult_BS is not None:
                consult = objectives.consult_supervision(out.stats, consult_BS, cfg.model.knowledge.consult_loss_coef)
                out = out._replace(loss=out.loss + consult, aux_loss=out.aux_loss + consult)
        if anchor_BS is not None:
            anchor = distill.anchor_loss(out.logits_BSV, teacher, batch["idx_BS"], anchor_BS, cfg.objective,
                                         batch.get("doc_ids_BS"))
            out = out._replace(loss=out.loss + anchor)
        off_loss = torch.zeros((), device=out.loss.device)
        if read_BS is not None:
            off_loss = objectives.forget_pass(engine, batch["idx_BS"], batch["targets_BS"], forget_BS, read_BS,
                                              cfg.objective, batch.get("doc_ids_BS"), prior_BS, train_data.prior)
            out = out._replace(loss=out.loss + off_loss)
        engine.backward(out.loss)
        acc.add(out.loss, out.aux_loss, off_loss, out.stats)
        if cfg.deepspeed.zero_stage == 0 and micro == t.grad_accum - 1:  # the gradients are all-reduced by now
            grad_norm = plain_dp.before_step(engine, t.grad_clip)
        engine.step()
    if cfg.deepspeed.zero_stage > 0:
        grad_norm = engine.get_global_grad_norm()
    acc.reduce(info, grad_norm)  # the step's one collective and one read-back
    if t.on_nonfinite == "abort" and acc.host_sums[4] > 0:
        # Every rank sees the same reduced sums, so all stop together and none waits on a dead peer. The step's
        # weights are never checkpointed (DeepSpeed also drops an update whose gradients are non-finite).
        found = ds_checkpoint.latest(run_dir)
        raise TrainingAborted(
            f"non-finite loss {acc.host_sums[0]} at step {step} ({int(acc.host_sums[4])} of {acc.micro_batches} "
            f"micro-batches); the run stops before this step is checkpointed; last good checkpoint: "
            f"{found[0] if found else 'none'}"
        )
    if not engine.was_step_applied():
        # Non-finite gradients (agreed over ranks: DeepSpeed's overflow flag, or without ZeRO the norm of the
        # all-reduced gradients, train.plain_dp) and the update was dropped.
        what = f"non-finite gradients at step {step}; the update was dropped"
        if t.on_nonfinite == "abort":
            found = ds_checkpoint.latest(run_dir)
            raise TrainingAborted(f"{what}; last good checkpoint: {found[0] if found else 'none'}")
        log.warning("%s (train.on_nonfinite=skip)", what)
    return acc


def _metrics(cfg: Config, engine, info: DistInfo, step: int, acc: StepStats, lr: float, seconds: float, peak: float,
             teacher=None):
    seq_len, t = cfg.data.seq_len, cfg.train
    stats = acc.moe_stats(on_host=True)
    cost = flops.realized(cfg.model, stats, seq_len) if stats else flops.nominal(cfg.model, seq_len)
    flops_per_token = cost.flops_per_token
    if cfg.objective.knowledge_off_pass:  # the forget pass, on about the ordinary pass's routed rows (the same
        # routers on nearly the same inputs; the pass's own counts are not collected)
        flops_per_token += objectives.forget_pass_flops(cfg.model, cfg.objective, seq_len, stats or None)
    if teacher is not None:  # the frozen teacher's forward (distillation, anchor)
        flops_per_token += flops.nominal(teacher.cfg, seq_len).inference_flops_per_token
    loss, ce, aux, off, _, _ = (value / acc.micro_batches for value in acc.host_sums)
    return StepMetrics(
        step=step + 1,
        loss=loss,
        ce=ce,
        aux=aux,
        knowledge_off=off,
        lr=float(lr),
        grad_norm=acc.grad_norm,
        overflow_rows=int(acc.host_sums[5]),
        tokens=t.micro_batch_size * t.grad_accum * info.world_size * seq_len,
        seconds=seconds,
        flops_per_token=flops_per_token,
        peak_flops=peak,
        skipped=not engine.was_step_applied(),
        consult_rate_L=[float(s.consulting_tokens) / max(acc.tokens, 1) for s in stats],
        load_share_LE=[(s.expert_load_E / s.expert_load_E.sum().clamp(min=1)).tolist() for s in stats],
    )


def _train_steps(cfg, engine, train_data, info, run_dir, start_step, peak, logger, teacher,
                 relocation: Relocation):
    """Steps ``start_step .. max_steps - 1``: update, steer the controllers, log, checkpoint; at
    ``objective.relocate_at`` the relocation phase starts (``train.relocation``)."""
    t, model = cfg.train, engine.module
    knowledge = knowledge_parameter_names(model) if cfg.objective.always_on_grad == "ablated" else None
    bar = tqdm(total=t.max_steps, initial=start_step, disable=info.rank != 0 or not t.progress, desc="train")
    losses, steps, window = [], [], []
    history = max(t.collapse_window, 1)
    for step in range(start_step, t.max_steps):
        if step == relocation.at:
            teacher = relocation.switch(engine, info)
        phase_cfg = relocation.config(step)  # cfg, or its phase before / from relocate_at
        tick, lr = time.perf_counter(), engine.get_lr()[0]
        acc = _one_step(phase_cfg, engine, train_data, info, run_dir, step, teacher, knowledge)
        if engine.was_step_applied() and model.moe_layers() and t.trainable not in FROZEN_ROUTING:
            model.update_controllers(acc.moe_stats())  # the same all-reduced counts on every rank
        last = _metrics(phase_cfg, engine, info, step, acc, lr, time.perf_counter() - tick, peak, teacher)
        losses.append(last.loss)
        steps.append(last)
        window.append(last)
        done = step + 1
        checkpoint = done % t.ckpt_every == 0 or done == t.max_steps or relocation.checkpoints_after(done)
        # Also before each checkpoint: a resume from it logs only later steps, so a row still in the window
        # when a crash follows the checkpoint would be missing from metrics.csv for good.
        if logger is not None and (done % t.log_every == 0 or checkpoint):
            for m in window:
                logger.log(m)
            window = []
        bar.set_postfix(loss=f"{last.loss:.3f}", tok_s=f"{last.tokens_per_s:.0f}", mfu=f"{last.mfu:.1%}")
        bar.update(1)
        if info.rank == 0 and done % t.log_every == 0 and model.moe_layers():
            recent = steps[-history:]
            for warning in collapse_warnings(
                [m.load_share_LE for m in recent],
                [m.consult_rate_L for m in recent],
                cfg.model.knowledge.consult_rate,
                t.collapse_max_share,
                t.collapse_window,
            ):
                log.warning("step %d: %s", done, warning)
        if done % t.log_every == 0:
            log.info(
                "step %d loss %.4f lr %.2e tok/s %.0f mfu %.2f%%",
                done,
                last.loss,
                lr,
                last.tokens_per_s,
                100 * last.mfu,
            )
        if checkpoint:
            samples = done * t.micro_batch_size * t.grad_accum * info.world_size
            state = {"step": done, "samples": samples, "identity": _identity(cfg, info.world_size)}
            ds_checkpoint.save(engine, run_dir, state, info, t.keep_checkpoints)
    bar.close()
    return losses, steps
