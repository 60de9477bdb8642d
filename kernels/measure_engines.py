"""``python -m pure_reasoner.kernels.measure_engines``: measure this machine's GEMM engines again (with the
thread count torch uses here), update the cache (``kernels.engines``) and print the key and the choice. For a
choice first measured while the machine was busy. Runs under the entry points' malloc tuning
(``kernels.malloc_tuning``), so it measures the choice they use."""

from __future__ import annotations

import argparse
import json

import torch

from pure_reasoner.kernels import engines
from pure_reasoner.kernels.malloc_tuning import reexec_with_malloc_tunables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.kernels.measure_engines", description=__doc__)
    parser.parse_args(argv)
    key = engines.machine_key(torch.get_num_threads())
    choice = engines.load_or_measure(engines.default_cache_path(), key, fresh=True)
    print(key)
    print(json.dumps(choice.as_dict()))


if __name__ == "__main__":
    reexec_with_malloc_tunables()
    main()
