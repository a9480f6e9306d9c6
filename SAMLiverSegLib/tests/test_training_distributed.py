"""Decoder fine-tuning under DDP: a real ``torchrun`` run of 2 CPU processes (gloo backend).

The tiny random-weight SAM of the test is registered by ``scripts/run_with_tiny_sam.py``, which each
torchrun worker runs before ``samliverseg.cli.commands.main(["train", ...])`` (a model registered in the
pytest process is not visible to the workers). The cache has 3 training slices and 1 validation
slice, so with ``batch_size: 1`` per process (global batch 2) every epoch ends with a short
batch whose share on rank 1 is empty, and rank 1 scores no validation slice: the weighting of
the ranks' losses and the Dice averaging are exercised, not only the even case.

What must hold (decoder_trainer.py's docstring): DDP averages the ranks' gradients, each rank's
loss is weighted by ``n_r * W / N``, and the prompts of the whole global batch are drawn on every
rank, so 2 processes x ``batch_size`` b reach the weights of 1 process with ``batch_size`` 2b
(up to float rounding), and differ from 1 process with ``batch_size`` b. Measured: the largest
difference is ~4e-6 over the tensors with a real gradient; the attention key biases (exactly
zero gradient, Adam-amplified rounding noise) differ by up to ~7e-5 and are not compared.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from libtest_helpers import make_phantom_cache, save_tiny_sam, tiny_sam_fixture, torchrun_tiny_sam
from samliverseg.models.build_sam import build_model
from samliverseg.training import checkpoint as ck
from samliverseg.training.config import config_from_dict
from samliverseg.training.decoder import DecoderTrainer
from samliverseg.training.progress import ProgressWriter, read_events

TINY = "tiny_ddp_sam"
ROOT = Path(__file__).resolve().parents[1]

tiny_model = tiny_sam_fixture(TINY)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    m = make_phantom_cache(root, 4, (10, 64, 64), (3.0, 3.0, 5.0), seed0=10, val_fraction=0.25, seed=0)
    assert m["summary"]["train"] == 3 and m["summary"]["val"] == 1
    weights = save_tiny_sam(root / f"{TINY}.pth", seed=5)
    return {"cache": root / "cache", "weights": weights, "root": root}


def _cfg_dict(cache, out, batch_size):
    return dict(cache=str(cache["cache"]), output=str(out), base_model=TINY, checkpoint=str(cache["weights"]),
                epochs=2, batch_size=batch_size, lr=2e-3, box_jitter_px=3, points_per_slice=1, max_slices_per_case=1,
                seed=3, device="cpu", scheduler="cosine", model_name="ddp-tiny")


def _single(cache, out, batch_size):
    pw = ProgressWriter(stream=open(os.devnull, "w"), err_stream=open(os.devnull, "w"))
    t = DecoderTrainer(config_from_dict(_cfg_dict(cache, out, batch_size)), progress=pw)
    res = t.run()
    return t, res


@pytest.fixture(scope="module")
def ddp_run(cache):
    """One real 2-process torchrun of `samliverseg train` (rank 0 registers the model)."""
    root = cache["root"]
    cfg = root / "ddp.yaml"
    cfg.write_text(json.dumps(_cfg_dict(cache, root / "ddp-run", batch_size=1)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SAMLIVERSEG_MODELS=str(root / "models"))
    proc = torchrun_tiny_sam("cli", TINY, "train", "--config", cfg, env=env, timeout=300, cwd=str(root))
    return {"proc": proc, "run": root / "ddp-run", "models": root / "models"}


def test_torchrun_two_processes_finishes_with_one_set_of_progress_lines(ddp_run):
    proc = ddp_run["proc"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    events = read_events(proc.stdout)
    names = [e["event"] for e in events]
    # rank 0 only: one start, one done, one line per optimiser step (2 global batches x 2 epochs)
    assert names.count("start") == 1 and names.count("done") == 1, names
    assert names[0] == "start" and names[-1] == "done"
    assert names.count("step") == 4 and names.count("epoch") == 2 and names.count("validation") == 2
    start = events[0]
    assert start["world_size"] == 2 and start["global_batch_size"] == 2 and start["train_slices"] == 3
    assert events[-1]["step"] == events[-1]["total_steps"] == 4
    run = ddp_run["run"]
    for name in ("last.pt", "best.pt", "model.pth"):
        assert (run / name).is_file()
    meta = torch.load(run / "model.pth", weights_only=True)["metadata"]
    assert meta["kind"] == "decoder" and meta["base_model"] == TINY
    assert ck.load_checkpoint(run / "last.pt")["world_size"] == 2
    assert build_model(TINY, checkpoint=run / "model.pth") is not None  # the full state loads strictly
    # registered once, by rank 0, under the config's model_name
    assert sorted(p.name for p in ddp_run["models"].iterdir()) == ["ddp-tiny"]
    assert "registered the model as 'ddp-tiny'" in proc.stderr
    log = (run / "train.log").read_text()
    assert "2 processes (gloo)" in log and log.count("decoder fine-tuning of") == 1


def test_two_processes_equal_one_process_with_the_global_batch(cache, ddp_run, tmp_path):
    assert ddp_run["proc"].returncode == 0, ddp_run["proc"].stderr[-4000:]
    ddp = ck.load_checkpoint(ddp_run["run"] / "last.pt")
    same, res = _single(cache, tmp_path / "one-b2", batch_size=2)  # 1 process, batch 2 = 2 x 1
    assert res["step"] == 4
    one = ck.load_checkpoint(tmp_path / "one-b2" / "last.pt")
    assert ddp["model"].keys() == one["model"].keys()
    # The attention key biases have an exactly zero gradient (softmax is invariant to adding
    # q.b_k to every logit of a row): their computed gradients are rounding noise, which Adam
    # scales up to ~lr-sized steps, so they differ between any two summation orders. Every other
    # trained tensor must agree.
    keys = [k for k in one["model"] if not k.endswith("k_proj.bias")]
    assert len(keys) > 0.9 * len(one["model"])
    worst = max(float((ddp["model"][k] - one["model"][k]).abs().max()) for k in keys)
    assert worst < 2e-5, f"2-process and 1-process weights differ by {worst}"
    # the same validation Dice (rank 1 had no val slice: weight 0 in the average) and train loss
    for a, b in zip(ddp["history"], one["history"]):
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # the trainer generators (jitter/points) stayed in step with the single process
    assert torch.equal(ddp["rng"]["trainer"], one["rng"]["trainer"])
    # training moved the decoder (the comparison could fail) ...
    base = build_model(TINY, checkpoint=cache["weights"]).state_dict()
    moved = max(float((one["model"][k] - base[k]).abs().max()) for k in one["model"])
    assert moved > 1e-3
    # ... and 1 process with the per-process batch (1) is another run
    _single(cache, tmp_path / "one-b1", batch_size=1)
    other = ck.load_checkpoint(tmp_path / "one-b1" / "last.pt")
    assert max(float((other["model"][k] - ddp["model"][k]).abs().max()) for k in keys) > 1e-4
