"""``train.fused_adam=true``: torch's fused AdamW kernel trains as the default kernel does.

The oracle is the same run with torch's default (per-operation) AdamW. The two compute the same update in a different
order of float operations: measured over 40 steps of ``experiment=plain`` the losses differ by at most 1.7e-6. RTOL is
``test_compile``'s (2e-5), far below the step-to-step change of the loss, which the test checks.
"""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import metrics, run_in_process

RTOL = 2e-5
RUN = ("train.max_steps=8", "train.micro_batch_size=4", "train.export=false", "train.ckpt_every=100")


@pytest.mark.parametrize("zero", ["deepspeed=zero1", "deepspeed=zero0"])
def test_fused_adam_tracks_the_default_kernel(tmp_path, dist_info, zero):
    built = []
    real = torch.optim.AdamW.__init__

    def init(self, *args, **kwargs):
        built.append(kwargs.get("fused"))
        real(self, *args, **kwargs)

    runs = {}
    for fused in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.optim.AdamW, "__init__", init)
            run_in_process(tmp_path / str(fused), *RUN, zero, f"train.fused_adam={str(fused).lower()}")
        runs[fused] = torch.tensor([r["loss"] for r in metrics(tmp_path / str(fused))], dtype=torch.float64)
    assert built == [None, True]  # DeepSpeed built torch's AdamW once per run, fused only when asked
    ref = runs[False]
    assert len(ref) == 8 and (ref.diff().abs() / ref[1:]).min() > 20 * RTOL
    torch.testing.assert_close(runs[True], ref, rtol=RTOL, atol=0)
