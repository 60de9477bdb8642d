"""Which engine runs each class of CPU fp32 GEMM: picked by a short measurement on the running machine.

The fastest fp32 GEMM engine depends on the CPU, not on the code: on the AMD EPYC this project was first
tuned on, oneDNN's dense GEMM runs ~2x MKL's (MKL takes slower code paths on non-Intel CPUs); on an
Intel Xeon of the same size MKL is ~15% ahead. So each shape class gets the engine that was fastest here:

- ``dense``: a large dense GEMM (``kernels.Linear``), engines ``mkl`` (``torch.mm``: MKL on x86 builds)
  and ``onednn`` (``torch.ops.mkldnn._linear_pointwise``).
- ``grouped``: per-expert GEMMs of a few dozen rows against big expert weights (the knowledge path's
  forward and input gradient), engines ``mkl`` (a ``torch.mm`` per expert), ``onednn`` (one per expert),
  ``grouped_mm`` (``F.grouped_mm``) and ``small`` (``kernels.small_gemm``: kernels built here that stream
  each weight once; an expert with more rows than it serves is a dense GEMM, run on the ``grouped_large`` pick).
  ``small`` is offered where a C++ compiler is.
- ``grouped_wgrad``: the same rows' weight gradients (``aᵀ b`` per expert), same engines.
- ``grouped_large``: per-expert GEMMs of a hundred rows and more against the same weights (what ``small`` hands
  on), engines ``mkl`` and ``onednn``, one call per expert, timed over the three GEMMs such an expert runs in a
  training step (x @ w, dy @ wᵀ, the weight gradient) through ``small``'s hand-off where it is built. Not the
  ``dense`` pick: oneDNN takes the weight as [O, I] and an expert's is [I, O], so the two engines' order can differ
  between the classes and between the three GEMMs (a 2-core Intel Xeon, through ``small``'s hand-off: oneDNN 5%
  behind MKL on x @ w, 2% ahead on dy @ wᵀ, 22% behind on the weight gradient; timed on x @ w alone, the pick
  flipped on a 3% difference).

Each class is timed at one representative shape (``_CLASS_SHAPES``) with the threads the process uses
now, engines interleaved, the fastest of a few calls kept. A grouped call streams 128 MiB of weights (or writes
as much weight gradient), so the whole measurement takes 1.2 s on an idle 2-core Intel Xeon (`Intel(R) Xeon(R)
Processor`, four classes, measured 2026-12-06) and ~3 s of
calls on a busy one (``measure``'s budget: fewer repeats), plus each engine's untimed first call.
The choice is cached in a JSON file (``$PURE_REASONER_CACHE_DIR`` or ``$XDG_CACHE_HOME/pure_reasoner`` or
``~/.cache/pure_reasoner``, file ``engines.json``) under a key naming the CPU model, core count, thread
count and torch version, so another machine or torch build measures again. ``PURE_REASONER_GEMM_ENGINE``
(``auto`` | ``mkl`` | ``onednn``; the training config's ``train.gemm_engine`` sets it) overrides the
measurement; ``python -m pure_reasoner.kernels.measure_engines`` measures again (e.g. after a busy first
run). The only state is ``_resolve``'s lru_cache: one choice per (override, threads, cache file).
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

ENV_OVERRIDE = "PURE_REASONER_GEMM_ENGINE"
ENV_CACHE_DIR = "PURE_REASONER_CACHE_DIR"
OVERRIDES = ("auto", "mkl", "onednn")
CLASSES = ("dense", "grouped", "grouped_wgrad", "grouped_large")
ENGINES = {"dense": ("mkl", "onednn"), "grouped": ("mkl", "onednn", "grouped_mm", "small"),
           "grouped_wgrad": ("mkl", "onednn", "grouped_mm", "small"), "grouped_large": ("mkl", "onednn")}
# Representative shapes: dense [M, I] @ [I, O]; grouped E experts x rows each, [I] -> [O]. 1024-wide
# weights and 16 rows per expert are the knowledge path's low-consult-rate regime (benchmarks/), and 32 such
# experts (128 MiB) are more than a core's caches hold, so each call streams its weights from memory as training
# does (the weight gradients: writes them).
_CLASS_SHAPES = {"dense": dict(rows=512, in_dim=1024, out_dim=1024),
                 "grouped": dict(experts=32, rows=16, in_dim=1024, out_dim=1024),
                 "grouped_wgrad": dict(experts=32, rows=16, in_dim=1024, out_dim=1024),
                 "grouped_large": dict(experts=8, rows=128, in_dim=1024, out_dim=1024)}
_CACHE_VERSION = 4  # 2: the ``small`` engine joined the grouped classes; 3: the ``grouped_large`` class; 4: that
# class timed over the three GEMMs of a training step

Timer = Callable[[str, str, Callable[[], object]], float]


@dataclass(frozen=True)
class EngineChoice:
    """The engine of each shape class, and where the choice came from.

    source: ``measured`` (just now), ``cache`` (an earlier measurement on this machine) or ``override``.
    gflops: class -> engine -> GFLOP/s measured (empty for an override).
    """

    dense: str
    grouped: str
    grouped_wgrad: str
    grouped_large: str
    source: str
    gflops: dict[str, dict[str, float]] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict:
        """JSON-ready: the engine per class, the source, the measured GFLOP/s."""
        return {**{c: getattr(self, c) for c in CLASSES}, "source": self.source, "gflops": self.gflops}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s model name on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int, model: str | None = None) -> str:
    """What a measurement holds for: CPU model, cores, threads, torch version (and oneDNN presence) and the
    allocator (``kernels.malloc_tuning.regime``: with glibc's defaults every call that allocates a 128 MiB
    weight gradient faults it in afresh, which decides that class's ranking on its own)."""
    from pure_reasoner.kernels.malloc_tuning import regime

    onednn = "onednn" if torch.backends.mkldnn.is_available() else "no-onednn"
    return (f"{model or cpu_model()} | {os.cpu_count()} cores | {threads} threads | torch {torch.__version__}"
            f" | {onednn} | malloc {regime(os.environ)}")


def default_cache_path() -> Path:
    """``engines.json`` under $PURE_REASONER_CACHE_DIR, else $XDG_CACHE_HOME/pure_reasoner, else ~/.cache/…"""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]) / "engines.json"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pure_reasoner" / "engines.json"


def available(shape_class: str) -> tuple[str, ...]:
    """The engines of ``shape_class`` this machine has (oneDNN may be absent from the torch build, a C++ compiler
    from the machine; asking builds ``small`` once)."""
    from pure_reasoner.kernels import small_gemm

    has = {"onednn": torch.backends.mkldnn.is_available, "small": small_gemm.available}
    return tuple(e for e in ENGINES[shape_class] if has.get(e, lambda: True)())


def _cases(shape_class: str) -> tuple[dict[str, Callable[[], object]], float]:
    """(engine -> one call at the class's representative shape, its FLOPs)."""
    from pure_reasoner.kernels import onednn_gemm
    from pure_reasoner.kernels.expert_mlp import torch_mlp

    s = _CLASS_SHAPES[shape_class]
    gen = torch.Generator().manual_seed(0)
    if shape_class == "dense":
        a = torch.randn(s["rows"], s["in_dim"], generator=gen)
        w = torch.randn(s["out_dim"], s["in_dim"], generator=gen)
        fns = {"mkl": lambda: torch.mm(a, w.t()), "onednn": lambda: onednn_gemm.matmul(a, w.t())}
        return {e: fns[e] for e in available(shape_class)}, 2.0 * a.shape[0] * a.shape[1] * w.shape[0]
    num_rows = s["experts"] * s["rows"]
    offsets = torch.arange(1, s["experts"] + 1, dtype=torch.int32) * s["rows"]
    x = torch.randn(num_rows, s["in_dim"], generator=gen)
    if shape_class in ("grouped", "grouped_large"):
        w = torch.empty(s["experts"], s["in_dim"], s["out_dim"]).uniform_(-1, 1, generator=gen)  # faster than randn
        if shape_class == "grouped_large":
            dy = torch.randn(num_rows, s["out_dim"], generator=gen)
            fns = {e: _large_step(e, x, w, dy, offsets) for e in available(shape_class)}
            return fns, 3 * 2.0 * num_rows * s["in_dim"] * s["out_dim"]
        fns = {e: (lambda e=e: torch_mlp.grouped_matmul_with(e, x, w, offsets)) for e in available(shape_class)}
    else:
        b = torch.randn(num_rows, s["out_dim"], generator=gen)
        fns = {e: (lambda e=e: torch_mlp.grouped_matmul_wgrad_with(e, x, b, offsets)) for e in available(shape_class)}
    return fns, 2.0 * num_rows * s["in_dim"] * s["out_dim"]


def _large_step(engine: str, x_RI, w_EIO, dy_RO, offsets_E) -> Callable[[], object]:
    """x @ w, dy @ wᵀ and the weight gradient of experts with many rows, on ``engine``: through ``small``'s hand-off
    (every expert above its row limit) where ``small`` is built, else through the engine's own grouped calls."""
    from pure_reasoner.kernels import small_gemm
    from pure_reasoner.kernels.expert_mlp import torch_mlp

    if small_gemm.available():
        large = torch_mlp.large_matmul(engine)
        return lambda: (small_gemm.grouped_matmul(x_RI, w_EIO, offsets_E, max_rows=0, large=large),
                        small_gemm.grouped_matmul(dy_RO, w_EIO.transpose(1, 2), offsets_E, max_rows=0, large=large),
                        small_gemm.grouped_matmul_wgrad(x_RI, dy_RO, offsets_E, max_rows=0, large=large))
    return lambda: (torch_mlp.grouped_matmul_with(engine, x_RI, w_EIO, offsets_E),
                    torch_mlp.grouped_matmul_with(engine, dy_RO, w_EIO.transpose(1, 2), offsets_E),
                    torch_mlp.grouped_matmul_wgrad_with(engine, x_RI, dy_RO, offsets_E))


def wall_timer(shape_class: str, engine: str, fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (the default timer; tests pass a fake one)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(timer: Timer = wall_timer, repeats: int = 3, budget_s: float = 3.0) -> EngineChoice:
    """Time every engine of every class (engines interleaved, one untimed call first) and keep the fastest.

    Args:
        timer: (class, engine, fn) -> seconds of one call.
        repeats: timed calls per engine; the fastest counts (other work on the machine only slows calls).
        budget_s: seconds of calls (as the timer reports them) the whole measurement may take: a class stops
            repeating once it spent its share (on a busy machine, after one timed round).
    """
    picks, gflops = {}, {}
    for shape_class in CLASSES:
        fns, flops = _cases(shape_class)
        best, spent = {e: float("inf") for e in fns}, 0.0
        for round_ in range(repeats + 1):  # round 0 warms up (oneDNN compiles a kernel per shape)
            if round_ > 1 and spent > budget_s / len(CLASSES):
                break
            for engine, fn in fns.items():
                seconds = timer(shape_class, engine, fn)
                spent += seconds
                if round_ > 0:
                    best[engine] = min(best[engine], seconds)
        picks[shape_class] = min(best, key=best.get)
        gflops[shape_class] = {e: round(flops / max(t, 1e-12) / 1e9, 1) for e, t in best.items()}
    return EngineChoice(**picks, source="measured", gflops=gflops)


def forced(override: str) -> EngineChoice:
    """Every class on the engine ``override`` names (``mkl`` or ``onednn``)."""
    if override not in OVERRIDES or override == "auto":
        raise ValueError(f"GEMM engine override must be one of {OVERRIDES[1:]}, got {override!r}")
    if override == "onednn" and not torch.backends.mkldnn.is_available():
        raise ValueError("GEMM engine override 'onednn': this torch build has no oneDNN")
    return EngineChoice(**dict.fromkeys(CLASSES, override), source="override")


def _read_cache(path: Path) -> dict:
    """The cache file's entries; {} when absent. A file that does not parse is reported and ignored."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"version {data.get('version')!r}")
        return data["entries"]
    except (ValueError, OSError, AttributeError) as err:
        warnings.warn(f"GEMM engine cache {path} is unreadable ({err}); measuring again", stacklevel=2)
        return {}


def _from_entry(entry: object) -> EngineChoice | None:
    """The cached choice, or None when the entry names a class or engine this build does not have."""
    if not isinstance(entry, dict) or any(entry.get(c) not in available(c) for c in CLASSES):
        return None
    return EngineChoice(**{c: entry[c] for c in CLASSES}, source="cache", gflops=entry.get("gflops", {}))


def _write_cache(path: Path, entries: dict) -> None:
    """Write the entries atomically (a temporary file renamed over the old one); warn when it cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1))
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"cannot write the GEMM engine cache {path} ({err}); the choice holds for this process only",
                      stacklevel=2)


def load_or_measure(path: Path, key: str, timer: Timer = wall_timer, fresh: bool = False) -> EngineChoice:
    """The choice cached under ``key`` in ``path``, else (or when ``fresh``) a new measurement, then cached.

    The entry records the 1-minute load average at measurement time: a choice measured on a busy machine
    can be redone with ``python -m pure_reasoner.kernels.measure_engines``.
    """
    entries = _read_cache(path)
    cached = None if fresh else _from_entry(entries.get(key))
    if cached is not None:
        return cached
    choice = measure(timer)
    entries[key] = {**{c: getattr(choice, c) for c in CLASSES}, "gflops": choice.gflops,
                    "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    _write_cache(path, entries)
    return choice


@lru_cache(maxsize=16)
def _resolve(override: str, threads: int, cache_path: str) -> EngineChoice:
    if override != "auto":
        return forced(override)
    return load_or_measure(Path(cache_path), machine_key(threads))


def current() -> EngineChoice:
    """This process's choice: the override in $PURE_REASONER_GEMM_ENGINE, else measured (or cached) with
    the thread count in use now. Measures at most once per (override, threads, cache file)."""
    override = os.environ.get(ENV_OVERRIDE, "auto").strip().lower() or "auto"
    if override not in OVERRIDES:
        raise ValueError(f"{ENV_OVERRIDE} must be one of {OVERRIDES}, got {override!r}")
    return _resolve(override, torch.get_num_threads(), str(default_cache_path()))


def cpu_fp32(*tensors: torch.Tensor) -> bool:
    """These tensors' GEMMs are the ones the engine choice is about: CPU, fp32."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)

