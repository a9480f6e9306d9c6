"""One gloo rank of a tiny run of any trainer kind where rank 1 alone asks to stop after its first step
(``test_training_base.two_ranks``); writes ``OUT_DIR/rank{rank}.json``: its device, the device rule,
the outcome, its step and the step of ``last.pt`` after the run.

usage: ddp_rank_one_cancels.py CONFIG_JSON OUT_DIR   (WORLD_SIZE, RANK, MASTER_ADDR/PORT set as torchrun does)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)

import libtest_helpers  # noqa: E402
from samliverseg.core.errors import CancelledError  # noqa: E402
from samliverseg.training import checkpoint as ck  # noqa: E402
from samliverseg.training import distributed  # noqa: E402
from samliverseg.training.config import config_from_dict  # noqa: E402
from samliverseg.training.progress import ProgressWriter  # noqa: E402
from samliverseg.training.train import build_trainer  # noqa: E402

libtest_helpers.register_tiny_sam()
info, _ = distributed.setup("cpu")
cfg = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
tr = build_trainer(cfg, ProgressWriter(rank=info.rank), info.rank)
report = {"rank": info.rank, "device": str(tr.device),
          "rule": str(distributed.rank_device(cfg.device, distributed.current()))}
try:  # only rank 1 is asked to stop, after its first step
    tr.run(cancel=lambda: info.rank == 1 and tr.step >= 1)
    report["outcome"] = "done"
except CancelledError:
    report["outcome"] = "cancelled"
report["step"] = tr.step
last = Path(cfg.output) / "last.pt"  # rank 0 writes it; the barrier after saving makes it visible
report["last_step"] = ck.load_checkpoint(last)["step"] if last.exists() else None
Path(sys.argv[2], f"rank{info.rank}.json").write_text(json.dumps(report))
del tr
distributed.cleanup(agreed=True)  # both ranks stopped at the same step (the cancel vote)
