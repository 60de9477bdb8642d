"""Two CPU jobs on the same cores: step time alone and two at once, by thread count and OpenMP wait policy.

    python -m pure_reasoner.benchmarks.threads [--steps 12] [--json PATH]

Each setting runs one or two worker processes (this module with ``--worker``), each timing fwd+bwd steps of the
same randomly initialised model (the science recipes' size: d_model 128, 4 layers, 16 knowledge experts of width
128 plus 16 null experts, a reasoning expert of width 256; 8 sequences of 512 tokens) and reporting its median
seconds per step after 3 warm-up steps. Workers of one setting start together. GNU OpenMP spin-waits between
parallel regions by default, so two 2-thread jobs on 2 cores spend their time spinning against each other;
``OMP_WAIT_POLICY=PASSIVE`` or one thread per job avoids it (results: benchmarks/RESULTS.md). Run it on an
otherwise idle machine: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

# (name, one environment per worker): threads and wait policy of each job
SETTINGS: tuple[tuple[str, tuple[dict[str, str], ...]], ...] = (
    ("alone, 2 threads", ({"OMP_NUM_THREADS": "2"},)),
    ("alone, 2 threads, PASSIVE", ({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},)),
    ("two jobs, 2 threads each", ({"OMP_NUM_THREADS": "2"},) * 2),
    ("two jobs, 2 threads each, PASSIVE", ({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},) * 2),
    ("two jobs, 1 thread each", ({"OMP_NUM_THREADS": "1"},) * 2),
    ("two jobs, 2 threads and 1 thread", ({"OMP_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "1"})),
)
WARMUP = 3


def worker(steps: int, batch: int, seq_len: int) -> dict:
    """Median seconds per fwd+bwd step of the benchmark model in this process."""
    import torch

    from pure_reasoner.moe import KnowledgeConfig, ModelConfig, PureReasonerLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, max_seq_len=seq_len, reasoning_width=256,
                      knowledge=KnowledgeConfig(num_experts=16, num_null_experts=16, expert_width=128))
    model = PureReasonerLM(cfg).train()
    idx_BS = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    times = []
    for i in range(steps + WARMUP):
        start = time.perf_counter()
        model(idx_BS).logits_BSV.logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return {"threads": torch.get_num_threads(), "median_s": statistics.median(times), "steps": steps}


def run_setting(envs: Sequence[dict[str, str]], steps: int, batch: int, seq_len: int) -> list[dict]:
    """Start one worker per environment at once; their reports, in order."""
    cmd = [sys.executable, "-m", "pure_reasoner.benchmarks.threads", "--worker", "--steps", str(steps),
           "--batch", str(batch), "--seq-len", str(seq_len)]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    procs = [subprocess.Popen(cmd, env={**base, **env}, stdout=subprocess.PIPE, text=True) for env in envs]
    reports = []
    for proc, env in zip(procs, envs, strict=True):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"worker with {env} failed (exit {proc.returncode})")
        reports.append({**json.loads(out.strip().splitlines()[-1]), "env": env})
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.benchmarks.threads",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per worker (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--settings", default="all", help="'all' or comma-separated indices into SETTINGS")
    parser.add_argument("--json", metavar="PATH", help="write the records as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2:
        parser.error(f"--steps, --batch must be >= 1 and --seq-len >= 2, got {args.steps}, {args.batch}, "
                     f"{args.seq_len}")
    if args.worker:
        print(json.dumps(worker(args.steps, args.batch, args.seq_len)))
        return 0
    chosen = SETTINGS if args.settings == "all" else [SETTINGS[int(i)] for i in args.settings.split(",")]
    records = []
    for name, envs in chosen:
        load = os.getloadavg()
        for job, report in enumerate(run_setting(envs, args.steps, args.batch, args.seq_len)):
            records.append({"setting": name, "job": job, "load_avg_start": [round(x, 2) for x in load], **report})
            print(f"{name:<36} job {job}: {report['threads']} threads, {report['median_s']:.3f} s/step")
    if args.json:
        from pure_reasoner.benchmarks.common import write_json

        write_json(args.json, records, steps=args.steps, batch=args.batch, seq_len=args.seq_len)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
