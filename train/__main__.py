"""``python -m train [group=option ...] [key=value ...]``: the main training job (Hydra).

Multi-process: ``deepspeed --no_local_rank --num_gpus 2 --module train ...`` (ranks read LOCAL_RANK
from the environment; the launcher's ``--local_rank`` argument would collide with Hydra's parser).
"""

from __future__ import annotations

import os

# Nothing is downloaded at run time: data, tokenizer and model all come from this machine.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from train.config import register_configs, to_config  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    from train.dist import exit_rank, multi_rank
    from train.loop import TrainingAborted, run

    try:
        config = to_config(cfg)
        summary = run(config, Path(HydraConfig.get().runtime.output_dir), OmegaConf.to_yaml(cfg, resolve=True))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        exit_rank(2)
    except TrainingAborted as err:
        print(f"aborted: {err}", file=sys.stderr)
        exit_rank(3)
    except OSError as err:  # e.g. a full disk while checkpointing; the previous checkpoint stays `latest`
        print(f"error: {err}", file=sys.stderr)
        exit_rank(4)
    except RuntimeError:  # on several ranks: a collective timed out (a hung peer) or a peer died
        if not multi_rank():
            raise
        traceback.print_exc()
        exit_rank(5)
    print(
        f"done: {summary.steps} steps, final loss {summary.final_loss:.4f}, "
        f"median {summary.tokens_per_s:.0f} tokens/s, MFU {summary.mfu:.2%}, {summary.wall_s:.1f} s"
        + (f" (resumed from {summary.resumed_from})" if summary.resumed_from else "")
    )
    return summary.final_loss


if __name__ == "__main__":
    main()
