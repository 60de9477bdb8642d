"""The GEMM engine choice (``kernels.engines``): picks the fastest under a fake timer, honours the override,
measures again on another machine or torch build or after a corrupt cache; every engine computes the same."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pure_reasoner.kernels import engines
from pure_reasoner.kernels.expert_mlp.torch_mlp import grouped_matmul_wgrad_with, grouped_matmul_with

ROOT = Path(__file__).resolve().parents[2]

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

# Seconds per call the fake timer reports: each class has a different winner.
FAKE_S = {
    "dense": {"mkl": 2.0, "onednn": 1.0},
    "grouped": {"mkl": 3.0, "onednn": 5.0, "grouped_mm": 4.0, "small": 3.5},
    "grouped_wgrad": {"mkl": 3.0, "onednn": 2.5, "grouped_mm": 0.5, "small": 1.5},
    "grouped_large": {"mkl": 1.0, "onednn": 1.5},
}


class FakeTimer:
    """Reports FAKE_S without running anything; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, shape_class, engine, fn):
        self.calls += 1
        return FAKE_S[shape_class][engine]


def _fastest(shape_class: str) -> str:
    times = {e: t for e, t in FAKE_S[shape_class].items() if e in engines.available(shape_class)}
    return min(times, key=times.get)


def test_measure_picks_the_fastest_engine_of_each_class():
    choice = engines.measure(FakeTimer())
    assert choice.source == "measured"
    for shape_class in engines.CLASSES:
        assert getattr(choice, shape_class) == _fastest(shape_class)


@needs_onednn
def test_measure_uses_the_fastest_call_not_the_first():
    """A warm-up call (oneDNN compiles its kernel there) and a slow outlier must not decide."""
    calls = {}

    def timer(shape_class, engine, fn):
        n = calls[shape_class, engine] = calls.get((shape_class, engine), 0) + 1
        if engine == "onednn":
            return 100.0 if n in (1, 3) else 1.0  # slow warm-up and one slow repeat, else fastest
        return 2.0

    choice = engines.measure(timer, repeats=3, budget_s=float("inf"))
    assert (choice.dense, choice.grouped, choice.grouped_wgrad, choice.grouped_large) == ("onednn",) * 4
    assert choice.gflops["dense"]["onednn"] == pytest.approx(2 * 512 * 1024**2 / 1.0 / 1e9, abs=0.05)  # rounded to 0.1


@pytest.mark.parametrize("small_built", [True, False], ids=["small-hand-off", "no-small"])
@pytest.mark.parametrize("engine", engines.ENGINES["grouped_large"])
def test_large_experts_are_timed_over_a_training_steps_three_gemms(engine, small_built, monkeypatch):
    """The ``grouped_large`` case computes x @ w, dy @ wᵀ and xᵀ dy per expert (a float64 einsum is the oracle), on
    the engine named, through ``small``'s hand-off or, where ``small`` is not built, the engine's own grouped calls,
    and counts the FLOPs of all three."""
    from pure_reasoner.kernels import small_gemm

    if engine not in engines.available("grouped_large") or (small_built and not small_gemm.available()):
        pytest.skip(f"{engine} (or the small engine) is not available in this build")
    if not small_built:
        monkeypatch.setattr(small_gemm, "available", lambda: False)
    fns, flops = engines._cases("grouped_large")
    shape = engines._CLASS_SHAPES["grouped_large"]
    y_RO, dx_RI, dw_EIO = fns[engine]()
    num_experts, rows = shape["experts"], shape["rows"]
    gen = torch.Generator().manual_seed(0)  # the case's own inputs, drawn again in its order
    x = torch.randn(num_experts * rows, shape["in_dim"], generator=gen).double()
    w = torch.empty(num_experts, shape["in_dim"], shape["out_dim"]).uniform_(-1, 1, generator=gen).double()
    dy = torch.randn(num_experts * rows, shape["out_dim"], generator=gen).double()
    x_ERI, dy_ERO = x.view(num_experts, rows, -1), dy.view(num_experts, rows, -1)
    torch.testing.assert_close(y_RO.double(), torch.einsum("eri,eio->ero", x_ERI, w).reshape_as(dy), rtol=1e-4,
                               atol=1e-3)
    torch.testing.assert_close(dx_RI.double(), torch.einsum("ero,eio->eri", dy_ERO, w).reshape_as(x), rtol=1e-4,
                               atol=1e-3)
    torch.testing.assert_close(dw_EIO.double(), torch.einsum("eri,ero->eio", x_ERI, dy_ERO), rtol=1e-4, atol=1e-3)
    assert flops == 3 * 2 * num_experts * rows * shape["in_dim"] * shape["out_dim"]


def test_measurement_stops_repeating_past_its_budget():
    timer = FakeTimer()
    engines.measure(timer, repeats=50, budget_s=1.0)  # every fake call takes >= 0.5 s: two rounds per class
    assert timer.calls == 2 * sum(len(engines.available(c)) for c in engines.CLASSES)


def test_cache_is_used_on_the_same_machine_and_remeasured_on_another(tmp_path, monkeypatch):
    path, timer = tmp_path / "engines.json", FakeTimer()
    key = engines.machine_key(2, model="Test CPU A")
    first = engines.load_or_measure(path, key, timer)
    calls = timer.calls
    assert first.source == "measured" and calls > 0
    again = engines.load_or_measure(path, key, timer)
    assert again.source == "cache" and timer.calls == calls
    assert again.as_dict() | {"source": "measured"} == first.as_dict()
    other_cpu = engines.machine_key(2, model="Test CPU B")
    assert engines.load_or_measure(path, other_cpu, timer).source == "measured" and timer.calls == 2 * calls
    assert engines.load_or_measure(path, engines.machine_key(1, model="Test CPU A"), timer).source == "measured"
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert engines.machine_key(2, model="Test CPU A") != key
    assert engines.load_or_measure(path, engines.machine_key(2, model="Test CPU A"), timer).source == "measured"
    monkeypatch.undo()
    for var in ("GLIBC_TUNABLES", "LD_PRELOAD"):  # another allocator: its own measurement
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    assert engines.machine_key(2, model="Test CPU A") != key
    assert engines.load_or_measure(path, engines.machine_key(2, model="Test CPU A"), timer).source == "measured"
    monkeypatch.undo()
    assert engines.machine_key(2, model="Test CPU A") == key
    assert len(json.loads(path.read_text())["entries"]) == 5  # every measurement kept under its own key
    assert engines.load_or_measure(path, key, timer, fresh=True).source == "measured"  # kernels.measure_engines


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "entries": {}}', "[1, 2]", ""],
                         ids=["garbage", "other-version", "not-an-object", "empty"])
def test_corrupt_cache_is_remeasured_with_a_warning(tmp_path, content):
    path, timer = tmp_path / "engines.json", FakeTimer()
    path.write_text(content)
    with pytest.warns(UserWarning, match="unreadable"):
        choice = engines.load_or_measure(path, "key", timer)
    assert choice.source == "measured" and timer.calls > 0
    assert json.loads(path.read_text())["entries"]["key"]["dense"] == _fastest("dense")  # rewritten, readable


def test_cache_entry_naming_an_unknown_engine_is_remeasured(tmp_path):
    path, timer = tmp_path / "engines.json", FakeTimer()
    path.write_text(json.dumps({"version": engines._CACHE_VERSION,
                               "entries": {"key": dict.fromkeys(engines.CLASSES, "cublas")}}))
    assert engines.load_or_measure(path, "key", timer).source == "measured"


def test_unwritable_cache_warns_and_still_chooses(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="cannot write"):
        choice = engines.load_or_measure(blocker / "engines.json", "key", FakeTimer())
    assert choice.dense == _fastest("dense")


@pytest.mark.parametrize("override", ["mkl", "onednn"])
def test_override_is_honoured_without_measuring(override, monkeypatch, tmp_path):
    if override == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    monkeypatch.setenv(engines.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(engines.ENV_OVERRIDE, override.upper())
    choice = engines.current()
    assert choice.source == "override"
    assert (choice.dense, choice.grouped, choice.grouped_wgrad) == (override,) * 3
    assert not (tmp_path / "engines.json").exists()


def test_bad_override_names_the_value(monkeypatch):
    monkeypatch.setenv(engines.ENV_OVERRIDE, "cublas")
    with pytest.raises(ValueError, match="cublas"):
        engines.current()
    with pytest.raises(ValueError, match="'auto'"):
        engines.forced("auto")


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(engines.ENV_CACHE_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert engines.default_cache_path() == tmp_path / "pure_reasoner" / "engines.json"
    monkeypatch.setenv(engines.ENV_CACHE_DIR, str(tmp_path / "mine"))
    assert engines.default_cache_path() == tmp_path / "mine" / "engines.json"


# Empty experts first, in the middle and last: the per-expert loops' edges.
COUNTS = [0, 5, 1, 0, 9, 3, 0]


@pytest.mark.parametrize("engine", engines.ENGINES["grouped"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous-w", "transposed-view-w"])
def test_every_grouped_engine_matches_float64(engine, transposed):
    if engine not in engines.available("grouped"):
        pytest.skip(f"engine {engine} not available here (oneDNN absent from the build, or no C++ compiler)")
    offsets_E = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    rows, dim_in, dim_out = sum(COUNTS), 24, 40
    x_RI, b_RO = torch.randn(rows, dim_in), torch.randn(rows, dim_out)
    w_EIO = (torch.randn(len(COUNTS), dim_out, dim_in).transpose(1, 2) if transposed
             else torch.randn(len(COUNTS), dim_in, dim_out))
    got_RO = grouped_matmul_with(engine, x_RI, w_EIO, offsets_E)
    got_EIO = grouped_matmul_wgrad_with(engine, x_RI, b_RO, offsets_E)
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        want_RO = x_RI[start:end].double() @ w_EIO[e].double()
        want_IO = x_RI[start:end].double().t() @ b_RO[start:end].double()  # zeros for an empty expert
        torch.testing.assert_close(got_RO[start:end].double(), want_RO, rtol=1e-5, atol=1e-5, msg=f"y, expert {e}")
        torch.testing.assert_close(got_EIO[e].double(), want_IO, rtol=1e-5, atol=1e-5, msg=f"dw, expert {e}")
        start = end


def test_real_measurement_is_consistent(tmp_path):
    """The real timer on this machine picks, per class, the engine it measured fastest (its speed is a
    benchmark matter, not a test's: ``python -m pure_reasoner.kernels.measure_engines`` prints it)."""
    choice = engines.load_or_measure(tmp_path / "engines.json", "key")
    for shape_class in engines.CLASSES:
        measured = choice.gflops[shape_class]
        assert set(measured) == set(engines.available(shape_class))
        assert measured[getattr(choice, shape_class)] == max(measured.values())  # ties: rounded to 0.1


def test_measure_engines_help_prints_usage_without_measuring(tmp_path):
    """``measure_engines --help`` prints its usage and exits 0; it neither measures nor writes the cache."""
    cache_dir = tmp_path / "cache"
    env = {**os.environ, engines.ENV_CACHE_DIR: str(cache_dir), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pure_reasoner.kernels.measure_engines", "--help"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:"), proc.stdout
    assert "measure_engines" in proc.stdout
    assert not cache_dir.exists() and not (tmp_path / "xdg").exists(), "--help wrote a cache"
