"""A first look: forward batches through a randomly initialised model and print what it cost.

``python -m pure_reasoner.moe.demo [--preset small] [--steps 50]``: the consult controller steers the router's
selection biases for ``--steps`` batches (no training), then one batch is measured: realized consult
rate per layer and realized active parameters and FLOPs per token against the nominal figures.
"""

from __future__ import annotations

import argparse

import torch

from pure_reasoner.moe.flops import nominal, realized
from pure_reasoner.moe.model import PureReasonerLM
from pure_reasoner.moe.presets import PRESET_NAMES, preset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.moe.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES[:3])
    parser.add_argument("--steps", type=int, default=50, help="controller warm-up batches")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = PureReasonerLM(cfg).eval()
    seq = cfg.max_seq_len
    with torch.no_grad():
        for _ in range(args.steps):
            out = model(torch.randint(0, cfg.vocab_size, (args.batch, seq)))
            model.update_controllers(out.stats)
        out = model(torch.randint(0, cfg.vocab_size, (args.batch, seq)))
    nom, real = nominal(cfg, seq), realized(cfg, out.stats, seq)
    print(f"preset {args.preset}: {nom.total_params / 1e6:.2f}M params, "
          f"target consult rate {cfg.knowledge.consult_rate}")
    for i, s in enumerate(out.stats):
        print(f"  MoE layer {i}: consult rate {float(s.consult_rate):.3f}, slot rate {float(s.slot_rate):.3f}")
    print(f"active params/token: nominal {nom.active_params / 1e6:.3f}M, realized {real.active_params / 1e6:.3f}M")
    print(f"training FLOPs/token: nominal {nom.flops_per_token / 1e6:.2f}M, realized {real.flops_per_token / 1e6:.2f}M")


if __name__ == "__main__":
    main()
