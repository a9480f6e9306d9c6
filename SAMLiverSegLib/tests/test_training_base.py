"""The trainer base class (``training/base.py``): one rule for every trainer kind.

Each property is one test parametrized over all kinds of ``models.kinds``, run for real on tiny
configurations (``libtest_helpers.tiny_config``) and a phantom cache: the cancel vote, the device choice
and the barrier after saving in real 2-process gloo runs (``WORLD_SIZE=2``, as torchrun sets it);
the empty-target rule of the validation; exact resume (interrupt, resume, compare bit for bit).
Plus the generated ``train --help`` / ``--example-config`` and the exit code of an unexpected error.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from libtest_helpers import SCRIPTS, TESTS_DIR, tiny_config, tiny_config_dict, writer
from samliverseg.core.errors import CancelledError
from samliverseg.models.kinds import KIND_NAMES, KINDS, resolve
from samliverseg.training import checkpoint as ck
from samliverseg.training.base import Trainer, item_dice
from samliverseg.training.config import config_from_dict, describe_keys, example_config
from samliverseg.training.progress import read_events

ROOT = TESTS_DIR.parent


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def test_every_kind_is_a_trainer_with_the_base_run_loop():
    for name in KIND_NAMES:
        cls = resolve(KINDS[name].trainer)
        assert issubclass(cls, Trainer) and cls.KIND == name
        for method in ("run", "save", "restore", "validate", "stop_requested", "export_model", "_cancel"):
            assert getattr(cls, method) is getattr(Trainer, method), (name, method)  # one implementation


# ------------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=KIND_NAMES)
def two_ranks(request, phantom_cache, tmp_path_factory):
    """A real 2-process gloo run of ``kind`` where rank 1 alone asks to stop after step 1."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"ddp_{kind}")
    cfg = tmp / "cfg.json"
    cfg.write_text(json.dumps(tiny_config_dict(kind, phantom_cache, tmp / "run", epochs=3)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "ddp_rank_one_cancels.py"), str(cfg), str(tmp)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    reports = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return {"kind": kind, "reports": reports, "events": read_events(outs[0][0]), "rank1_stdout": outs[1][0],
            "run": tmp / "run"}


@pytest.mark.slow  # a real 2-process run per kind: 15-30 s each on 2 shared cores
def test_cancel_vote_any_rank_stops_all_after_the_same_step(two_ranks):
    reports, ev = two_ranks["reports"], two_ranks["events"]
    assert [r["outcome"] for r in reports] == ["cancelled", "cancelled"]  # rank 0 never asked
    assert [r["step"] for r in reports] == [1, 1]
    assert ev[0]["event"] == "start" and ev[0]["world_size"] == 2
    assert ev[-1]["event"] == "cancelled" and ev[-1]["step"] == 1 and ev[-1]["exit_code"] == 130
    assert two_ranks["rank1_stdout"] == ""  # only rank 0 reports
    assert not (two_ranks["run"] / "model.pth").exists()


@pytest.mark.slow  # a real 2-process run per kind: 15-30 s each on 2 shared cores
def test_device_choice_is_the_rank_rule(two_ranks):
    assert [r["device"] for r in two_ranks["reports"]] == ["cpu", "cpu"]
    assert all(r["device"] == r["rule"] for r in two_ranks["reports"])


@pytest.mark.slow  # a real 2-process run per kind: 15-30 s each on 2 shared cores
def test_barrier_after_saving(two_ranks):
    """Rank 1 reads last.pt right after its run ends: rank 0 has finished writing it."""
    assert [r["last_step"] for r in two_ranks["reports"]] == [1, 1]
    assert ck.load_checkpoint(two_ranks["run"] / "last.pt")["world_size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rank_device_on_cuda():
    from samliverseg.training.distributed import DistInfo, rank_device
    n = torch.cuda.device_count()
    assert rank_device("cuda", DistInfo(1, 2, 1)) == torch.device("cuda", 1 % n)
    assert rank_device("cuda:0", DistInfo(1, 2, 1)) == torch.device("cuda", 1 % n)  # the index is the rank's
    assert rank_device("cuda:0", DistInfo()) == torch.device("cuda", 0)


# ------------------------------------------------------------------------------- validation
def test_item_dice_skips_an_empty_target():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    b[1:3, 1:3] = True
    assert math.isnan(item_dice(a, a)) and math.isnan(item_dice(b, a))  # empty target: no Dice
    assert item_dice(b, b) == pytest.approx(1.0) and item_dice(a, b) == pytest.approx(0.0)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_empty_target_rule(kind, phantom_cache, tmp_path):
    """The val case holds no tumour: with target tumor every kind has no val Dice (no validation
    event), best.pt follows last.pt; with target liver the same case is scored."""
    pw, out = writer()
    tr = resolve(KINDS[kind].trainer)(tiny_config(kind, phantom_cache, tmp_path / "t", target="tumor", epochs=1),
                                      progress=pw)
    res = tr.run()
    names = [e["event"] for e in out.events()]
    assert "validation" not in names and res["best_dice"] is None and tr.history[0]["val_dice"] is None
    best, last = ck.load_checkpoint(tmp_path / "t" / "best.pt"), ck.load_checkpoint(tmp_path / "t" / "last.pt")
    assert best["step"] == last["step"] == res["step"] > 0
    assert (tmp_path / "t" / "model.pth").exists()

    pw, out = writer()
    resolve(KINDS[kind].trainer)(tiny_config(kind, phantom_cache, tmp_path / "l", epochs=1), progress=pw).run()
    scores = [e for e in out.events() if e["event"] == "validation"]
    assert len(scores) == 1 and 0.0 <= scores[0]["dice"] <= 1.0


# ------------------------------------------------------------------------------- exact resume
def _weights(run: Path):
    c = ck.load_checkpoint(run / "last.pt")
    return {**c["model"], **{f"student/{k}": v for k, v in (c.get("student") or {}).items()}}


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_exact_resume(kind, phantom_cache, tmp_path):
    straight = resolve(KINDS[kind].trainer)(tiny_config(kind, phantom_cache, tmp_path / "a"), progress=writer()[0])
    res = straight.run()
    total = res["step"]
    assert total >= 2
    stop_at = max(1, total // 2 + (total % 2))  # mid-run (mid-epoch where an epoch has several steps)
    first = resolve(KINDS[kind].trainer)(tiny_config(kind, phantom_cache, tmp_path / "b"), progress=writer()[0])
    with pytest.raises(CancelledError):
        first.run(cancel=lambda: first.step >= stop_at)
    assert ck.load_checkpoint(tmp_path / "b" / "last.pt")["step"] == stop_at
    pw, out = writer()
    res2 = resolve(KINDS[kind].trainer)(tiny_config(kind, phantom_cache, tmp_path / "b"), progress=pw).run(resume=True)
    assert res2["step"] == total and out.events()[0]["resumed"] is True and out.events()[0]["step"] == stop_at
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert res2["best_dice"] == res["best_dice"]


# ------------------------------------------------------------------------------- CLI text
def test_train_help_lists_kinds_and_every_key(capsys):
    from samliverseg.cli.commands import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in KIND_NAMES:
        assert f"  {name} " in text and KINDS[name].summary in text
    from dataclasses import fields
    from samliverseg.training.config import TrainConfig, _options_class
    for f in fields(TrainConfig):
        if f.name not in ("unet", "adapter", "student", "semi"):
            assert f"  {f.name}: " in text, f.name
    for kind in ("unet", "adapter", "student", "semi"):
        for f in fields(_options_class(kind)):
            assert f"  {kind}.{f.name}: " in text, (kind, f.name)
    assert "unet.patch_size: List[int] = [128, 128, 128]" in describe_keys()


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_example_config_is_valid(kind, tmp_path, capsys):
    from samliverseg.cli.commands import main
    assert main(["train", "--example-config", kind]) == 0
    text = capsys.readouterr().out
    assert text == example_config(kind) and text.count("#") > 5
    data = yaml.safe_load(text)
    assert data["kind"] == kind
    cfg = config_from_dict(dict(data, cache=str(tmp_path / "c"), output=str(tmp_path / "o")))  # no unknown key
    assert cfg.kind == kind and (kind not in data or cfg.options() is not None)


@pytest.mark.slow
def test_example_config_runs_as_is(phantom_cache, tmp_path):
    """The unet example, unchanged but for cache, output and epochs, trains on the phantom cache."""
    text = example_config("unet").replace("/path/to/cache", str(phantom_cache["cache"]))
    text = text.replace("runs/unet1", str(tmp_path / "run")).replace("epochs: 10", "epochs: 1")
    text = text.replace("device: auto", "device: cpu")
    (tmp_path / "c.yaml").write_text(text)
    from samliverseg.training.train import main
    assert main(["--config", str(tmp_path / "c.yaml")]) == 0
    assert (tmp_path / "run" / "model.pth").exists()


def test_unexpected_error_exits_70(phantom_cache, tmp_path, capsys, monkeypatch):
    """A damaged case file in the cache (real bytes, nothing mocked) is no foreseen error: exit 70."""
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(phantom_cache["cache"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    victim = next(c for c in manifest["cases"] if c["split"] == "train" and c["labelled"])
    (cache / victim["file"]).write_bytes(b"PK\x03\x04 not a zip")
    monkeypatch.setenv("SAMLIVERSEG_MODELS", str(tmp_path / "models"))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(tiny_config_dict("unet", {"cache": cache}, tmp_path / "run")))
    from samliverseg.training.train import main
    assert main(["--config", str(cfg)]) == 70
    ev = read_events(capsys.readouterr().out)
    assert ev[-1]["event"] == "error" and ev[-1]["exit_code"] == 70


@pytest.mark.parametrize("mode", ["agreed", "peer_dies"])
def test_teardown_meets_at_a_barrier_and_does_not_wait_for_a_dead_peer(mode):
    """``cleanup(agreed=True)``: the ranks meet before leaving the group; when the peer died, the
    barrier's error (gloo sees the closed connection at once) is swallowed and the surviving rank
    still leaves the group and exits 0 (a bare ``dist.barrier()`` there raises: exit 1)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "ddp_teardown.py"), mode],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == ([0, 0] if mode == "agreed" else [0, 3]), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert float(outs[0][0].split()[-1]) < 60.0
