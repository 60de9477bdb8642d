"""Fault soak: SIGKILL a small training run at random moments, relaunch the same command, check nothing is lost.

    python scripts/soak.py --kills 20 --workdir /tmp/soak

1. An uninterrupted reference run (same command, its own run directory).
2. The soak run is launched, killed with SIGKILL (the whole process group), relaunched with the same
   command, ``--kills`` times. Every third kill fires 0-50 ms after a checkpoint write starts (a
   ``.tmp-step_*`` directory appears: inside DeepSpeed's writes, the fsyncs or the renames); the others
   0..``--max-delay`` s after the relaunched run logged its first new step.
3. After every kill, before relaunching: the checkpoint ``latest`` names must be complete (state JSON,
   RNG, model and optimizer files, each readable without unpickling code) - the one the relaunch will
   select - and the steps lost (last step logged minus the step of ``latest``) must be at most one
   checkpoint interval.
4. Every run that finishes (the final one, and any launch the kill moment missed, after which the soak
   starts over in a fresh directory) must have a whole loss curve (metrics.csv) bitwise equal to the
   reference's; each kill is behind exactly one such compared curve.

Prints the counts; exit status 1 if any check failed. Run from the repository root.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DIST_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def command(run_dir: Path, steps: int, ckpt_every: int) -> list[str]:
    return [
        sys.executable, "-m", "train", "experiment=smoke", "data.max_chars=60000", f"train.max_steps={steps}",
        f"train.ckpt_every={ckpt_every}", "train.log_every=1", "train.warmup_steps=2", "train.progress=false",
        "train.threads=1", "train.export=false", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in DIST_KEYS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def logged_losses(run_dir: Path) -> dict[int, str]:
    """step -> loss as written (strings: compared bitwise) from metrics.csv."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f) if r.get("loss")}


def _curve_problem(curve: dict[int, str], reference: dict[int, str]) -> str:
    """'' when ``curve`` has exactly the reference's steps with bitwise-equal losses, else how it differs."""
    mismatched = [s for s in reference if curve.get(s) != reference[s]]
    if sorted(curve) == sorted(reference) and not mismatched:
        return ""
    return f"differs from the uninterrupted run at steps {mismatched[:10]} (logged {len(curve)} of {len(reference)})"


def check_latest(run_dir: Path) -> tuple[int, str]:
    """(step, '') of the checkpoint ``latest`` names, or (step, problem) when it is incomplete or unreadable."""
    import torch

    from train.checkpoint import safe_torch_load

    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return 0, ""
    tag = pointer.read_text().strip()
    ckpt = root / tag
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        needed = ["rng_rank0.safetensors", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        missing = [n for n in needed if not (ckpt / n).is_file()]
        if missing:
            return int(state["step"]), f"{tag} lacks {missing}"
        with safe_torch_load():
            for name in needed[1:]:
                torch.load(ckpt / name, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        load_file(ckpt / needed[0])
        return int(state["step"]), ""
    except Exception as err:  # any failure to read the selected checkpoint is the bug this soak hunts
        return -1, f"{tag}: {type(err).__name__}: {err}"


def _kill_at(
    proc: subprocess.Popen, run_dir: Path, rng: random.Random, during_save: bool, max_delay: float, last_step: int
) -> str:
    """Wait for the moment, SIGKILL the process group; returns what the moment was ('' if the run ended first)."""
    start_steps = max(logged_losses(run_dir), default=0)
    root = run_dir / "checkpoints"
    deadline = time.monotonic() + 600
    delay = rng.uniform(0.0, max_delay)
    progressed_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        if during_save:
            if root.is_dir() and any(e.name.startswith(".tmp-step_") for e in os.scandir(root)):
                time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside DeepSpeed's writes or the fsyncs
                moment = "during a checkpoint write"
                break
            time.sleep(0.001)
            continue
        logged = max(logged_losses(run_dir), default=0)
        if progressed_at is None and logged > start_steps:
            progressed_at = time.monotonic()
        if progressed_at is not None and (time.monotonic() - progressed_at >= delay or logged >= last_step - 1):
            moment = f"{time.monotonic() - progressed_at:.2f} s after the first new step"
            break
        time.sleep(0.005)
    else:
        return ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return moment


def soak(workdir: Path, kills: int, steps: int, ckpt_every: int, seed: int, max_delay: float) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env, rng = _env(), random.Random(seed)
    ref_dir, run_dir = workdir / "reference", workdir / "soak"
    t0 = time.time()
    subprocess.run(command(ref_dir, steps, ckpt_every), env=env, check=True, capture_output=True)
    reference = logged_losses(ref_dir)
    problems, lost, moments, launches, fresh_start = [], [], [], 0, 0
    curves: list[tuple[int, str]] = []  # (kills behind a finished run's curve, '' or how it differs)
    while len(lost) < kills:
        launches += 1
        proc = subprocess.Popen(
            command(run_dir, steps, ckpt_every), env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        moment = _kill_at(proc, run_dir, rng, len(lost) % 3 == 2, max_delay, steps)
        if not moment:  # finished (or crashed) before the moment came: start over from scratch
            err = proc.stderr.read().decode()[-2000:]
            if proc.returncode != 0:
                problems.append(f"launch {launches} exited {proc.returncode}: {err}")
                break
            # The run finished unkilled: its curve covers the kills since the last fresh start; compare it, start over.
            curves.append((len(lost) - fresh_start, _curve_problem(logged_losses(run_dir), reference)))
            shutil.rmtree(run_dir)
            fresh_start = len(lost)
            continue
        proc.stderr.close()
        done = max(logged_losses(run_dir), default=0)
        step, problem = check_latest(run_dir)
        if problem:
            problems.append(f"kill {len(lost) + 1} ({moment}): latest checkpoint unusable: {problem}")
        lost.append(done - max(step, 0))
        moments.append(moment)
        if done - step > ckpt_every:
            problems.append(f"kill {len(lost)} ({moment}) lost {done - step} steps > ckpt_every={ckpt_every}")
    final = subprocess.run(command(run_dir, steps, ckpt_every), env=env, capture_output=True, text=True)
    if final.returncode != 0:
        problems.append(f"final run exited {final.returncode}: {final.stderr[-2000:]}")
    curves.append((len(lost) - fresh_start, _curve_problem(logged_losses(run_dir), reference)))
    problems += [f"curve after {n} kills: {problem}" for n, problem in curves if problem]
    return {
        "kills": len(lost),
        "kills_during_checkpoint_write": sum("checkpoint" in m for m in moments),
        "launches": launches + 1,
        "curves_compared": len(curves),
        "kills_behind_compared_curves": [n for n, _ in curves],
        "steps": steps,
        "ckpt_every": ckpt_every,
        "steps_lost_per_kill": lost,
        "max_steps_lost": max(lost, default=0),
        "curves_match": all(not problem for _, problem in curves),
        "problems": problems,
        "wall_s": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=2.0, help="seconds after the first new step")
    parser.add_argument("--workdir", type=Path, default=Path("runs/soak"))
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.steps < 1 or args.ckpt_every < 1:
        parser.error(f"--kills, --steps, --ckpt-every must be >= 1, got {args.kills}, {args.steps}, {args.ckpt_every}")
    result = soak(args.workdir, args.kills, args.steps, args.ckpt_every, args.seed, args.max_delay)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
