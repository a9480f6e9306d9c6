"""One gloo rank that joins the group, all-reduces once and leaves through ``distributed.cleanup``.

usage: ddp_teardown.py MODE   (WORLD_SIZE, RANK, MASTER_ADDR/PORT set as torchrun does)
MODE ``agreed``: every rank calls ``cleanup(agreed=True)``; ``peer_dies``: rank 1 exits at once
without leaving the group, rank 0 calls ``cleanup(agreed=True, timeout_s=3)``. Prints the seconds
``cleanup`` took.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from samliverseg.training import distributed  # noqa: E402

torch.set_num_threads(1)
mode = sys.argv[1]
info, _ = distributed.setup("cpu")
t = torch.ones(1)
torch.distributed.all_reduce(t)
assert float(t) == info.world_size
if mode == "peer_dies" and info.rank == 1:
    os._exit(3)
t0 = time.monotonic()
distributed.cleanup(agreed=True, timeout_s=3.0)
assert not torch.distributed.is_initialized()
print(f"{time.monotonic() - t0:.2f}")
