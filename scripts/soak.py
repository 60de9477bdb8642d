"""Fault soak: SIGKILL one rank of a small training run at random moments, relaunch the same command, check
nothing is lost and the result is bit-identical.

    python scripts/soak.py --kills 10 --workdir /tmp/soak                 # 2 expert-parallel ranks (deepspeed)
    python scripts/soak.py --ranks 1 --experiment smoke --kills 20        # one process

The run: ``--experiment`` (default ``decoupling_smoke``: the decoupling recipe's features on the smoke model:
knowledge in context, fresh drills, consult targets, gradient routing, the knowledge-off forget pass) on
``--ranks`` ranks (2: ``deepspeed --no_local_rank --num_gpus 2 --module pure_reasoner.train ... train.ep_size=2``, the
README's multi-process command, so the knowledge experts are split over the ranks).

1. An uninterrupted reference run (same command, its own run directory).
2. The soak run is launched, one of its ranks (chosen at random) is killed with SIGKILL, the launcher takes
   the other rank down, and the same command is relaunched, ``--kills`` times. The moments cycle through
   four kinds: 0..``--max-delay`` s after the launch logged its first new step; 0-10 ms after a checkpoint
   write starts while an earlier checkpoint is complete (a ``.tmp-step_*`` directory, the partial-write
   marker of ``train.ds_checkpoint``, appears; a kill that leaves it behind was inside the write);
   0..``startup`` s after its ranks started (data, engine, resume; ``startup``: the reference's time to
   its first step); and 0-20 ms after the export at the end starts (``train.export.EXPORT_TMP``
   appears), after which the same command only exports.
3. After every kill, before relaunching: the checkpoint ``latest`` names must be complete (state JSON, every
   rank's RNG and optimizer files, the model files, each readable without unpickling code) and the steps
   lost (last step logged minus the step of ``latest``) at most one checkpoint interval. Every relaunch
   must say, on every rank, that it resumed from that checkpoint.
4. Every run that finishes (the final one, and any launch the kill moment missed, after which the soak
   starts over in a fresh directory) must have a loss curve (every metrics.csv column but the wall-time
   ones) and final weights (every tensor of the export) bitwise equal to the reference's.

Prints the counts; exit status 1 if any check failed. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
KINDS = ("after a new step", "during a checkpoint write", "during startup or resume", "during the export")


def command(run_dir: Path, ranks: int, experiment: str, steps: int, ckpt_every: int) -> list[str]:
    """The training command the soak launches (the same for the reference and every relaunch)."""
    from pure_reasoner.train.dist import _free_port

    if ranks == 1:
        head = [sys.executable, "-m", "pure_reasoner.train"]
    else:
        head = [str(Path(sys.executable).parent / "deepspeed"), "--no_local_rank", "--num_gpus", str(ranks),
                "--master_port", str(_free_port()), "--module", "pure_reasoner.train", f"train.ep_size={ranks}",
                "train.micro_batch_size=4"]
    return [
        *head, f"experiment={experiment}", f"train.max_steps={steps}", f"train.ckpt_every={ckpt_every}",
        "train.log_every=1", "train.warmup_steps=2", "train.progress=false", "train.threads=1",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_KEYS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def last_logged_step(run_dir: Path) -> int:
    """The last step metrics.csv holds (0 when none)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines()[1:] if line.split(",")[0].isdigit()]
    return int(lines[-1].split(",")[0]) if lines else 0


def _result_problem(run_dir: Path, ref_dir: Path) -> str:
    """'' when the run's curve and final weights equal the reference's bit for bit, else how they differ."""
    from pure_reasoner.train.export import differing_tensors
    from pure_reasoner.train.metrics import read_curve

    curve, reference = read_curve(run_dir), read_curve(ref_dir)
    if curve != reference:
        steps = [r["step"] for r in curve]
        differ = [r["step"] for r, q in zip(curve, reference, strict=False) if r != q]
        return f"curve differs from the uninterrupted run at steps {differ[:10]} (logged steps {steps})"
    if not (run_dir / "export").is_dir():
        return "no export"
    differ = differing_tensors(run_dir / "export", ref_dir / "export")
    return f"final weights differ from the uninterrupted run's in {differ[:10]}" if differ else ""


def check_latest(run_dir: Path, ranks: int) -> tuple[int, str, str]:
    """(step, tag, '') of the checkpoint ``latest`` names ((0, '', '') when none), or (-1, tag, problem) when
    it is incomplete or a file of it is unreadable."""
    import torch
    from safetensors.torch import load_file

    from pure_reasoner.train.ds_checkpoint import safe_torch_load

    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return 0, "", ""
    tag = pointer.read_text().strip()
    ckpt = root / tag
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        needed = ["mp_rank_00_model_states.pt"]
        needed += [f"rng_rank{r}.safetensors" for r in range(ranks)]
        needed += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)]
        missing = [n for n in needed if not (ckpt / n).is_file()]
        if missing:
            return -1, tag, f"{tag} lacks {missing}"
        with safe_torch_load():
            for path in sorted(ckpt.glob("*.pt")):  # the experts' own files too, with expert parallelism
                torch.load(path, map_location="cpu", weights_only=True)
        for path in sorted(ckpt.glob("*.safetensors")):
            load_file(path)
        return int(state["step"]), tag, ""
    except Exception as err:  # any failure to read the selected checkpoint is the bug this soak hunts
        return -1, tag, f"{tag}: {type(err).__name__}: {err}"


def _ranks_of(proc: subprocess.Popen, ranks: int) -> list[int]:
    """pids of the ``python -m pure_reasoner.train`` processes of a launch (the launch itself with one rank)."""
    if ranks == 1:
        return [proc.pid]
    import psutil

    def runs_train(cmdline: list[str]) -> bool:
        return "-m" in cmdline and cmdline[cmdline.index("-m") + 1 :][:1] == ["pure_reasoner.train"]

    try:
        return [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if runs_train(p.cmdline())]
    except psutil.Error:  # a process ended while we looked
        return []


def _wait_for(proc: subprocess.Popen, ready, deadline: float) -> bool:
    """Poll ``ready()`` every 2 ms until it holds (True), the launch ends or the deadline passes (False)."""
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.002)
    return False


def _writing(root: Path) -> bool:
    """Whether a checkpoint write is under way (or was cut short): its ``.tmp-step_*`` directory exists."""
    return root.is_dir() and any(e.name.startswith(".tmp-step_") for e in os.scandir(root))


def _kill_one_rank(
    proc: subprocess.Popen, run_dir: Path, rng: random.Random, kind: str, ranks: int, max_delay: float,
    startup_s: float, last_step: int,
) -> str:
    """Wait for a moment of ``kind``, SIGKILL one rank, wait for the launch to end; returns the moment ('' if
    the run ended first)."""
    from pure_reasoner.train.export import EXPORT_TMP

    start_step = last_logged_step(run_dir)
    root = run_dir / "checkpoints"
    deadline = time.monotonic() + 600
    pids: list[int] = []

    def started() -> bool:
        pids[:] = _ranks_of(proc, ranks)
        return len(pids) == ranks

    if not _wait_for(proc, started, deadline):
        return ""

    def due(moment_s: float):  # the moment, or a step before the end: a kill must not miss the run
        return lambda: time.monotonic() >= moment_s or last_logged_step(run_dir) >= last_step - 1

    if kind == KINDS[1]:
        _wait_for(proc, lambda: not _writing(root), deadline)  # a write the last kill cut short is removed first
        # A write while a complete checkpoint exists, so the relaunch has one to resume from.
        _wait_for(proc, lambda: (_writing(root) and (root / "latest").exists())
                  or last_logged_step(run_dir) >= last_step - 1, deadline)
        time.sleep(rng.uniform(0.0, 0.01))  # somewhere inside DeepSpeed's writes, the RNG files or the fsyncs
    elif kind == KINDS[2]:
        _wait_for(proc, due(time.monotonic() + rng.uniform(0.0, startup_s)), deadline)
    elif kind == KINDS[3]:
        _wait_for(proc, lambda: not (run_dir / EXPORT_TMP).is_dir(), deadline)  # one cut short is removed first
        _wait_for(proc, lambda: (run_dir / EXPORT_TMP).is_dir(), deadline)
        time.sleep(rng.uniform(0.0, 0.02))  # reading the checkpoint, gathering the experts or writing the files
    else:
        _wait_for(proc, lambda: last_logged_step(run_dir) > start_step, deadline)
        _wait_for(proc, due(time.monotonic() + rng.uniform(0.0, max_delay)), deadline)
    if proc.poll() is not None:
        return ""
    victim = rng.randrange(ranks)
    try:
        os.kill(pids[victim], signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=120)  # the launcher ends the other rank
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of this launch (nothing, normally)
    except ProcessLookupError:
        pass
    proc.wait()
    inside = _writing(root) if kind == KINDS[1] else kind == KINDS[3] and (run_dir / EXPORT_TMP).is_dir()
    return f"{kind}: rank {victim} of {ranks}" + (", inside the write" if inside else "")


def _resumed_from(log: Path, ranks: int) -> list[str]:
    """What each rank said it resumed from ('' for from scratch), from a launch's output."""
    found = re.findall(r"rank \d+/\d+, .*, (?:resuming from (step_\d+)|from scratch)", log.read_text(errors="replace"))
    return found[:ranks]


def soak(
    workdir: Path, kills: int, steps: int, ckpt_every: int, seed: int, max_delay: float, ranks: int = 2,
    experiment: str = "decoupling_smoke",
) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env, rng = _env(), random.Random(seed)
    ref_dir, run_dir = workdir / "reference", workdir / "soak"
    t0 = time.time()
    launch = lambda d, log: subprocess.Popen(  # noqa: E731
        command(d, ranks, experiment, steps, ckpt_every), env=env, start_new_session=True, stdout=log,
        stderr=subprocess.STDOUT)
    with open(workdir / "reference.log", "w") as log:
        proc = launch(ref_dir, log)
        begun = time.monotonic()
        _wait_for(proc, lambda: last_logged_step(ref_dir) > 0, begun + 600)
        startup_s = time.monotonic() - begun
        proc.wait()
    if proc.returncode != 0:
        return {"problems": [f"reference run exited {proc.returncode}, see {workdir / 'reference.log'}"]}
    problems, lost, moments, launches, fresh_start, from_checkpoint = [], [], [], 0, 0, 0
    compared: list[int] = []  # kills behind each finished run's compared result
    expected = ""  # the checkpoint the next launch must resume from
    while len(lost) < kills:
        launches += 1
        log_path = workdir / f"launch_{launches:03d}.log"
        with open(log_path, "w") as log:
            proc = launch(run_dir, log)
            kind = KINDS[len(lost) % len(KINDS)]
            moment = _kill_one_rank(proc, run_dir, rng, kind, ranks, max_delay, startup_s, steps)
        said = _resumed_from(log_path, ranks)
        from_checkpoint += bool(said) and all(said)
        if any(tag != expected for tag in said):
            problems.append(f"launch {launches} resumed from {said}, expected {expected or 'scratch'}")
        if not moment:  # finished (or crashed) before the moment came
            if proc.returncode != 0:
                problems.append(f"launch {launches} exited {proc.returncode}, see {log_path}")
                break
            # The run finished unkilled: its result covers the kills since the last fresh start; compare, start over.
            compared.append(len(lost) - fresh_start)
            problems += [f"run of launch {launches}: {p}" for p in [_result_problem(run_dir, ref_dir)] if p]
            shutil.rmtree(run_dir)
            fresh_start, expected = len(lost), ""
            continue
        if len(said) < ranks and KINDS[2] not in moment:
            problems.append(f"launch {launches} was killed ({moment}) before every rank said what it resumed from")
        done = last_logged_step(run_dir)
        step, expected, problem = check_latest(run_dir, ranks)
        if problem:
            problems.append(f"kill {len(lost) + 1} ({moment}): latest checkpoint unusable: {problem}")
        lost.append(done - max(step, 0))
        moments.append(moment)
        if done - step > ckpt_every:
            problems.append(f"kill {len(lost)} ({moment}) lost {done - step} steps > ckpt_every={ckpt_every}")
    launches += 1
    log_path = workdir / f"launch_{launches:03d}.log"
    with open(log_path, "w") as log:
        final = launch(run_dir, log)
        final.wait()
    said = _resumed_from(log_path, ranks)
    from_checkpoint += bool(said) and all(said)
    if said != [expected] * ranks:
        problems.append(f"final launch resumed from {said}, expected {expected or 'scratch'}")
    if final.returncode != 0:
        problems.append(f"final launch exited {final.returncode}, see {log_path}")
    else:
        compared.append(len(lost) - fresh_start)
        problems += [f"final run: {p}" for p in [_result_problem(run_dir, ref_dir)] if p]
    return {
        "ranks": ranks,
        "experiment": experiment,
        "kills": len(lost),
        "kill_moments": moments,
        "kills_during_checkpoint_write": sum(KINDS[1] in m for m in moments),
        "kills_inside_checkpoint_write": sum(KINDS[1] in m and "inside the write" in m for m in moments),
        "kills_during_export": sum(KINDS[3] in m for m in moments),
        "kills_inside_export": sum(KINDS[3] in m and "inside the write" in m for m in moments),
        "launches": launches,  # of the soak run (the reference's not counted)
        "launches_resumed_from_a_checkpoint": from_checkpoint,
        "results_compared": len(compared),
        "kills_behind_compared_results": compared,
        "steps": steps,
        "ckpt_every": ckpt_every,
        "steps_lost_per_kill": lost,
        "max_steps_lost": max(lost, default=0),
        "problems": problems,
        "passed": not problems,
        "wall_s": round(time.time() - t0, 1),
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=2, choices=(1, 2))
    parser.add_argument("--experiment", default="decoupling_smoke", help="the conf/experiment to train")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=2.0, help="seconds after the first new step")
    parser.add_argument("--workdir", type=Path, default=Path("runs/soak"))
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.steps < 1 or args.ckpt_every < 1:
        parser.error(f"--kills, --steps, --ckpt-every must be >= 1, got {args.kills}, {args.steps}, {args.ckpt_every}")
    result = soak(args.workdir, args.kills, args.steps, args.ckpt_every, args.seed, args.max_delay, args.ranks,
                  args.experiment)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
