"""One gloo rank of the adapter trainer (``test_adapters.test_two_ranks_average_gradients_like_one_process``):
saves the gradients of one optimiser step (``grads{rank}.pt``), then runs the config and saves the
trained state (``final{rank}.pt``). The test imports :func:`grads_of_one_step` to get the same step
in its own process.

usage: adapter_ddp_step.py CONFIG OUT_DIR SPEC_JSON   (SPEC_JSON: ``libtest_helpers.tiny_sam_json``)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import libtest_helpers  # noqa: E402
from samliverseg.training import distributed  # noqa: E402
from samliverseg.training.adapter import AdapterTrainer  # noqa: E402
from samliverseg.training.config import load_config  # noqa: E402
from samliverseg.training.progress import ProgressWriter  # noqa: E402


def grads_of_one_step(cfg, rank):
    tr = AdapterTrainer(cfg, progress=ProgressWriter(rank=rank), rank=rank)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same non-zero adapters everywhere, so every gradient is non-trivial
        for p in tr.params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    tr.train_set = tr._build_set("train", lambda: False)
    loss_sum, count = tr.accumulate_gradients([[0, 1, 2], [3]])  # uneven shards on 2 ranks
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # (the unused IoU head)
            for n, p in tr.model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    cfg_path, out = sys.argv[1], Path(sys.argv[2])
    libtest_helpers.register_tiny_sam_json(sys.argv[3])
    info, _ = distributed.setup("cpu")
    cfg = load_config(cfg_path)
    torch.save(grads_of_one_step(cfg, info.rank), out / f"grads{info.rank}.pt")
    tr = AdapterTrainer(cfg, progress=ProgressWriter(rank=info.rank), rank=info.rank)
    tr.run()
    torch.save(tr.trainable_state(), out / f"final{info.rank}.pt")
    distributed.cleanup()
