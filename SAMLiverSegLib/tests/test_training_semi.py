"""Semi-SAM+ trainer (kind ``semi``): teachers, end-to-end runs, checkpoint/cancel/resume, DDP.

Real runs (no mocks) on phantoms: 2 labelled + 4 unlabelled training volumes and 1 labelled
validation volume, a tiny random-weight SAM (registered for this module) as the student's frozen
encoder and as the 2D teacher, a tiny random-weight SAM-Med3D for the 3D teacher. A random SAM
answers about 0.5 everywhere with variances of ~1e-5, so the runs use ``u_th = 1e-6`` and let the
adaptive rule raise it (``min_confident = 0.5``): that exercises both the threshold and its
adaptation.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from libtest_helpers import (build_tiny_sam, make_phantom_cache, registered, save_tiny_sam, sigterm_after_first_step,
                             tiny_sam_command, tiny_sam_fixture, tiny_sam_spec, torchrun_tiny_sam, writer)
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.modeling.slicing_student import student_from_sam
from samliverseg.demo.phantom import make_phantom
from samliverseg.automatic.student import load_student, predict_probabilities, segment_volume
from samliverseg.training import checkpoint as ck
from samliverseg.training.semi import math as sm
from samliverseg.training.config import config_from_dict
from samliverseg.training.progress import read_events
from samliverseg.training.semi.trainer import SemiTrainer, state_hash
from samliverseg.training.semi.teachers import Sam2DTeacher, Sam3DTeacher, TeacherView

TINY = "tiny_semi_sam"
ROOT = Path(__file__).resolve().parents[1]


SPEC = dict(normalization="minmax01")  # the tiny SAM's spec fields here (besides the common ones)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


tiny_model = tiny_sam_fixture(TINY, **SPEC)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    m = make_phantom_cache(root, 3, (10, 40, 40), (5.0, 5.0, 7.0), folder="labelled", n_unlabelled=4,
                           val_fraction=0.34, seed=0)
    cases = m["cases"]
    assert sum(c["split"] == "train" and c["labelled"] for c in cases) == 2
    assert sum(c["split"] == "train" and not c["labelled"] for c in cases) == 4
    assert sum(c["split"] == "val" for c in cases) == 1
    weights = save_tiny_sam(root / f"{TINY}.pth", seed=123)
    return {"cache": root / "cache", "weights": weights, "root": root}


SEMI = dict(teachers=TINY, warmup_epochs=1, finetune_epochs=1, slab_depth=4, hidden=8, n_transforms=2, u_th=1e-6,
            min_confident=0.5, u_th_max=0.25, weak_views=2, strong_views=1, rampup_epochs=1.0, rampdown_epochs=2.0,
            save_uncertainty=True)


def cfg_dict(data, out, semi=None, **kw):
    d = dict(kind="semi", cache=str(data["cache"]), output=str(out), base_model=TINY, checkpoint=str(data["weights"]),
             epochs=4, batch_size=1, lr=2e-3, seed=5, device="cpu", semi=dict(SEMI, **(semi or {})))
    d.update(kw)
    return d


def cfg_for(data, out, semi=None, **kw):
    return config_from_dict(cfg_dict(data, out, semi, **kw))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One uninterrupted run, shared by several tests."""
    out = tmp_path_factory.mktemp("run") / "a"
    pw, lines = writer()
    trainer = SemiTrainer(cfg_for(data, out), progress=pw)
    res = trainer.run()
    return {"out": out, "res": res, "events": lines.events(), "trainer": trainer}


# ------------------------------------------------------------------------------------ teachers
def test_sam2d_teacher_prompts_and_valid_slices():
    torch.manual_seed(0)
    sam = build_tiny_sam().eval()
    sam.spec = tiny_sam_spec(TINY, **SPEC)
    student = student_from_sam(sam, slab_depth=3, hidden=8).eval()
    vol = torch.rand(5, 24, 24) * 255
    emb = student.embed(vol)  # the shared embedding: (5, 32, 4, 4)
    coarse = torch.zeros(5, 16, 16, dtype=torch.bool)
    coarse[1, 4:9, 5:12] = True
    coarse[3, 2:4, 2:4] = True
    teacher = Sam2DTeacher(sam, box="auto")
    assert not teacher.use_box
    ans = teacher.predict(TeacherView(emb), coarse, torch.Generator().manual_seed(3))
    assert ans.valid.tolist() == [False, True, False, True, False]
    assert ans.mask_prob.shape == (5, 16, 16) and ans.point_prob.shape == (5, 16, 16)
    assert float(ans.mask_prob[[0, 2, 4]].abs().sum()) == 0.0  # no prompt, no vote
    assert 0.0 <= float(ans.mask_prob.min()) and float(ans.point_prob.max()) <= 1.0
    # the mask decode is SAM's decode with the dense mask prompt +-8 (no resizing: L = 4E = 16)
    dense = torch.where(coarse[1], 8.0, -8.0)[None, None]
    low, _ = sam.decode(emb[1:2], masks=dense, multimask_output=False)
    assert torch.allclose(ans.mask_prob[1], torch.sigmoid(low[0, 0]), atol=1e-6)
    # the point decode really differs from the mask decode, and depends on the drawn point
    assert not torch.allclose(ans.point_prob[1], ans.mask_prob[1])
    again = teacher.predict(TeacherView(emb), coarse, torch.Generator().manual_seed(3))
    assert torch.equal(again.point_prob, ans.point_prob)  # same generator -> same points
    # a box-only model gets the coarse mask's box with both prompts
    sam.spec = tiny_sam_spec(TINY, box_only=True, **SPEC)
    boxed = Sam2DTeacher(sam, box="auto")
    assert boxed.use_box
    b = boxed.predict(TeacherView(emb), coarse, torch.Generator().manual_seed(3))
    assert not torch.allclose(b.mask_prob[1], ans.mask_prob[1])
    with pytest.raises(InputError, match="teacher_box"):
        Sam2DTeacher(sam, box="sometimes")


def test_sam3d_teacher_runs_on_a_view(tmp_path):
    from samliverseg.models.build_sam3d import build_model3d, build_sam_med3d_tiny

    torch.manual_seed(0)
    path = tmp_path / "sam_med3d_tiny.pth"
    torch.save(build_sam_med3d_tiny().state_dict(), path)
    teacher = Sam3DTeacher(build_model3d("sam_med3d_tiny", checkpoint=path))
    img = (np.random.RandomState(0).rand(6, 30, 30) * 255).astype(np.float32)
    coarse = torch.zeros(6, 16, 16, dtype=torch.bool)
    coarse[2:4, 5:10, 5:10] = True
    view = TeacherView(None, lambda: img, spacing=(3.0, 3.0, 5.0), window_hu=(-160.0, 240.0))
    ans = teacher.predict(view, coarse, torch.Generator().manual_seed(0))
    assert ans.mask_prob.shape == (6, 16, 16) and ans.valid.shape == (6,)
    assert bool(ans.valid.all())  # a 64^3 cube at 1.5 mm covers this 30 mm-deep block
    assert 0.0 <= float(ans.point_prob.min()) <= float(ans.point_prob.max()) <= 1.0
    assert not torch.allclose(ans.mask_prob, ans.point_prob)
    empty = teacher.predict(view, torch.zeros(6, 16, 16, dtype=torch.bool), torch.Generator())
    assert not bool(empty.valid.any())


# ------------------------------------------------------------------------------------ config
def test_semi_options_validation(data, tmp_path):
    with pytest.raises(InputError, match="semi.bogus"):
        cfg_for(data, tmp_path / "x", semi={"bogus": 1})
    with pytest.raises(InputError, match="semi.u_th"):
        cfg_for(data, tmp_path / "x", semi={"u_th": 0.5})
    with pytest.raises(InputError, match="semi.rampup"):
        cfg_for(data, tmp_path / "x", semi={"rampup": "cosine"})
    with pytest.raises(InputError, match="semi.warmup_epochs"):
        SemiTrainer(cfg_for(data, tmp_path / "x", semi={"warmup_epochs": 3, "finetune_epochs": 2}),
                    progress=writer()[0])
    opts = cfg_for(data, tmp_path / "x", epochs=10, semi={"warmup_epochs": None, "finetune_epochs": None}).options()
    assert opts.phase_epochs(10) == (2, 6, 2) and opts.phase_epochs(2) == (0, 2, 0)


# ------------------------------------------------------------------------------------ end to end
def _steps(events):
    return [e for e in events if e["event"] == "step"]


def test_end_to_end_losses_schedule_and_outputs(run, data):
    ev, out, tr = run["events"], run["out"], run["trainer"]
    names = [e["event"] for e in ev]
    assert names[0] == "start" and names[-1] == "done"
    start = ev[0]
    assert start["labelled_cases"] == 2 and start["unlabelled_cases"] == 4 and start["val_cases"] == 1
    assert start["phases"] == {"warmup": 1, "semi": 2, "finetune": 1}
    steps = _steps(ev)
    # 2 labelled / (1 x 1 rank) -> 2 steps of warm-up; max(2, 4) -> 4 steps per later epoch
    assert [s["phase"] for s in steps] == [0] * 2 + [1] * 8 + [2] * 4 and ev[-1]["step"] == 14
    assert names.count("validation") == 4 and names.count("epoch") == 4
    for s in steps:
        for k in ("loss", "sup", "con", "rs_con", "lambda", "beta", "lr"):
            assert s[k] is not None and math.isfinite(s[k]), (k, s)
        assert s["loss"] == pytest.approx(s["sup"] + s["lambda"] * s["con"] + s["beta"] * s["rs_con"], rel=1e-5)
    # the schedule: t in epochs since the start of phase 1, 4 micro-batches per epoch
    s0 = 2  # the warm-up's steps
    for n, s in enumerate(steps):
        e = s["epoch"]
        first = 0 if e == 0 else s0 + 4 * (e - 1)  # the index of the epoch's first step
        t = (e - 1) + (n - first) / 4  # (micro-batch index within the epoch) / 4
        if s["phase"] == 0:
            assert s["lambda"] == 0.0 and s["beta"] == 0.0 and s["con"] == 0.0 and s["rs_con"] == 0.0
            assert s["lr"] == pytest.approx(2e-3) and s["conf_fraction"] is None
            continue
        assert s["beta"] == pytest.approx(sm.pseudo_weight(t, 0.3, 2.0), rel=1e-9)
        assert s["lr"] == pytest.approx(sm.poly_lr(2e-3, n - s0, 14 - s0, 0.9), rel=1e-9)
        if s["phase"] == 1:
            assert s["lambda"] == pytest.approx(sm.consistency_weight(t, 1.0, 1.0, "sigmoid"), rel=1e-9)
            assert s["con"] > 0 and s["rs_con"] > 0
            # the adaptive threshold raised u_th above 1e-6 and kept a strict part of the voxels
            assert 0.0 < s["conf_fraction"] < 1.0 and s["u_th"] > 1e-6
        else:
            assert s["lambda"] == 0.0 and s["con"] == 0.0 and 0.0 < s["conf_fraction"] < 1.0
    lams = [s["lambda"] for s in steps if s["phase"] == 1]
    betas = [s["beta"] for s in steps if s["phase"] > 0]
    assert lams == sorted(lams) and lams[0] < 0.01 and lams[-1] == 1.0  # ramp-up
    assert betas == sorted(betas, reverse=True)  # ramp-down
    # validation: EMA and student Dice, best = max
    vals = [e for e in ev if e["event"] == "validation"]
    assert all(0.0 <= v["dice"] <= 1.0 and 0.0 <= v["student_dice"] <= 1.0 for v in vals)
    assert run["res"]["best_dice"] == pytest.approx(max(v["dice"] for v in vals))
    # the EMA weights differ from the student's; best.pt / model.pth hold the EMA of the best epoch
    last = ck.load_checkpoint(out / "last.pt")
    assert last["kind"] == "semi" and set(last["model"]) == set(last["student"])
    assert any(not torch.allclose(last["model"][k], last["student"][k]) for k in last["model"])
    best = ck.load_checkpoint(out / "best.pt")
    best_epoch = max((v for v in vals if v["is_best"]), key=lambda v: v["step"])["epoch"]
    assert best["epoch"] == best_epoch + 1
    model = torch.load(out / "model.pth", weights_only=True)
    assert all(torch.equal(model["model"][k], best["model"][k]) for k in best["model"])
    meta = model["metadata"]
    assert meta["kind"] == "semi" and meta["window"] == "abdomen" and meta["label_meaning"].startswith("label > 0")
    assert meta["slab_depth"] == 4 and meta["hidden"] == 8 and meta["best_dice"] == run["res"]["best_dice"]
    # the model is a student: prompt-free inference with segment_volume (what `segment --model` runs)
    student, meta2 = load_student(out / "model.pth", kinds=("student", "semi"))
    assert meta2["kind"] == "semi" and student.decoder_norm == meta2["decoder_norm"]
    p = make_phantom((10, 40, 40), (5.0, 5.0, 7.0), seed=9, n_tumors=1)
    prob = predict_probabilities(student, meta2, p.to_volume())
    assert prob.shape == (10, 40, 40) and 0.0 <= prob.min() and prob.max() <= 1.0
    mask = segment_volume(out / "model.pth", p.to_volume(), device="cpu")
    assert mask.dtype == np.uint8 and mask.shape == (10, 40, 40) and np.array_equal(mask, (prob > 0.5).astype(np.uint8))
    # frozen phase-2 pseudo-labels and the uncertainty maps on the case grids
    assert len(list((out / "pseudo_labels").glob("*.pt"))) == 4
    for c in tr.unlabelled + tr.val:
        for name in ("variance", "confidence", "pseudo"):
            img = sitk.ReadImage(str(out / "uncertainty" / f"{c.case_id}_{name}.nii.gz"))
            assert img.GetSize() == tuple(reversed(c.full_shape))
            assert np.allclose(img.GetSpacing(), c.spacing) and np.allclose(img.GetOrigin(), c.origin)
            arr = sitk.GetArrayFromImage(img)
            if name == "variance":
                assert 0.0 <= arr.min() and arr.max() <= 0.25 and arr.max() > 0
            if name == "confidence":
                assert set(np.unique(arr)) <= {0, 1} and 0 < arr.mean() < 1


def test_three_teachers_two_2d_and_sam_med3d(data, tmp_path, monkeypatch):
    """A second 2D SAM (its own embedding cache of the weak views) and a SAM-Med3D teacher beside the
    base model: 3 teachers x 2 prompts x N transforms answers per voxel."""
    from samliverseg.models.build_sam3d import build_sam_med3d_tiny
    from samliverseg.models.weights import checkpoint_env_var

    other = TINY + "_b"
    with registered(tiny_sam_spec(other, **SPEC)):
        w2 = save_tiny_sam(tmp_path / f"{other}.pth", seed=7)
        monkeypatch.setenv(checkpoint_env_var(other), str(w2))
        w3 = tmp_path / "sam_med3d_tiny.pth"
        torch.save(build_sam_med3d_tiny().state_dict(), w3)
        cfg = cfg_for(data, tmp_path / "t3", epochs=1, semi={
            "teachers": f"{TINY}, {other}, sam_med3d_tiny", "sam_med3d_checkpoint": str(w3), "warmup_epochs": 0,
            "finetune_epochs": 0, "save_uncertainty": False})
        pw, lines = writer()
        tr = SemiTrainer(cfg, progress=pw)
        assert [t.name for t in tr.teachers] == [TINY, other, "sam_med3d_tiny"]
        assert tr.teachers[0].embedding_key == tr.student_key != tr.teachers[1].embedding_key
        tr.run()
        ev = lines.events()
        assert ev[0]["teachers"] == [TINY, other, "sam_med3d_tiny"] and ev[-1]["event"] == "done"
        keys = {p.name for p in (tmp_path / "t3" / "embeddings").iterdir()}
        assert keys == {tr.student_key, tr.teachers[1].embedding_key}
        # the second encoder embedded the weak views of the unlabelled cases only
        assert len(list((tmp_path / "t3" / "embeddings" / tr.teachers[1].embedding_key).glob("*.npy"))) == 4 * 2
        steps = _steps(ev)
        assert steps and all(s["phase"] == 1 and 0.0 < s["conf_fraction"] < 1.0 for s in steps)
        assert all(math.isfinite(s["rs_con"]) and s["rs_con"] > 0 for s in steps)
        # one ensemble by hand: 3 teachers x 2 prompts x 2 transforms = 12 answers, all in [0, 1]
        c = tr.unlabelled[0]
        coarse = tr._coarse_block(c) > 0.5
        g = torch.Generator().manual_seed(0)
        queue = [tr._pick(c.pool.weak, g) for _ in range(2)]
        res = tr._ensemble(c, torch.arange(4), coarse[:4], queue, g)
        assert res["mean"].shape == (4, 16, 16) and float(res["var"].max()) <= 0.25


def test_gradient_accumulation_step_count(data, tmp_path):
    """grad_accum 2: one optimiser step per 2 micro-batches (the last one of an epoch may be single)."""
    pw, lines = writer()
    res = SemiTrainer(cfg_for(data, tmp_path / "acc", epochs=2, grad_accum=2,
                              semi={"warmup_epochs": 1, "finetune_epochs": 0, "save_uncertainty": False}),
                      progress=pw).run()
    steps = _steps(lines.events())
    assert res["step"] == 1 + 2 and [s["phase"] for s in steps] == [0, 1, 1]  # 2 micro -> 1; 4 micro -> 2
    assert all(math.isfinite(s["loss"]) for s in steps) and lines.events()[0]["total_steps"] == 3


@pytest.mark.parametrize("stop_at", [5, 12])  # mid phase 1; mid phase 2 (frozen pseudo-labels reloaded)
def test_cancel_then_resume_reaches_the_same_weights(run, data, tmp_path, stop_at):
    out = tmp_path / "b"
    pw1, lines1 = writer()
    first = SemiTrainer(cfg_for(data, out), progress=pw1)
    with pytest.raises(CancelledError):
        first.run(cancel=lambda: first.step >= stop_at)
    ev1 = lines1.events()
    assert ev1[-1]["event"] == "cancelled" and ev1[-1]["step"] == stop_at
    assert ck.load_checkpoint(out / "last.pt")["step"] == stop_at
    emb = sorted((out / "embeddings").rglob("*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in emb]
    pw2, lines2 = writer()
    res = SemiTrainer(cfg_for(data, out), progress=pw2).run(resume=True)
    ev2 = lines2.events()
    assert ev2[0]["event"] == "start" and ev2[0]["resumed"] is True and ev2[0]["step"] == stop_at
    assert res["step"] == 14 and ev2[-1]["event"] == "done"
    assert [p.stat().st_mtime_ns for p in emb] == mtimes  # embeddings reused
    a, b = ck.load_checkpoint(run["out"] / "last.pt"), ck.load_checkpoint(out / "last.pt")
    for key in ("model", "student"):
        assert all(torch.allclose(a[key][k], b[key][k], atol=1e-6, rtol=0) for k in a[key]), key
    # the step lines after the resume are those of the uninterrupted run
    ref = {s["step"]: s for s in _steps(run["events"])}
    for s in _steps(ev2):
        for k in ("loss", "sup", "con", "rs_con", "conf_fraction", "lambda", "beta"):
            if ref[s["step"]][k] is None:
                assert s[k] is None
            else:
                assert s[k] == pytest.approx(ref[s["step"]][k], rel=1e-5, abs=1e-7), (s["step"], k)
    with pytest.raises(CheckpointError, match="semi.hidden"):
        SemiTrainer(cfg_for(data, out, semi={"hidden": 12}), progress=writer()[0]).run(resume=True)


@pytest.mark.slow
def test_cli_sigterm_then_resume_through_the_progress_protocol(run, data, tmp_path, capsys):
    cfg = tmp_path / "semi.yaml"
    cfg.write_text(json.dumps(cfg_dict(data, tmp_path / "cli")))
    cmd = tiny_sam_command("train", TINY, "--config", cfg, **SPEC)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc, events, err = sigterm_after_first_step(cmd, env, timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert events[-1]["event"] == "cancelled" and events[-1]["step"] < 14
    saved = ck.load_checkpoint(tmp_path / "cli" / "last.pt")
    assert saved["step"] == events[-1]["step"]
    from samliverseg.training.train import main as train_main  # the resume in this process (tiny model registered)
    capsys.readouterr()
    code = train_main(["--config", str(cfg), "--resume"])
    ev2 = read_events(capsys.readouterr().out)
    assert code == 0
    assert ev2[0]["resumed"] and ev2[0]["step"] == saved["step"] and ev2[-1]["event"] == "done"
    a, b = ck.load_checkpoint(run["out"] / "last.pt"), ck.load_checkpoint(tmp_path / "cli" / "last.pt")
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6, rtol=0) for k in a["model"])


@pytest.mark.slow
def test_ddp_two_ranks_identical_ema_and_pseudo_labels(data, tmp_path):
    """torchrun, 2 CPU ranks (gloo): every rank ends with the same θ and θ' and computes the same
    pseudo-labels (hashes written by each rank, ``semi.rank_hashes``)."""
    cfg = cfg_dict(data, tmp_path / "ddp", semi={"rank_hashes": True, "save_uncertainty": False})
    (tmp_path / "ddp.yaml").write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = torchrun_tiny_sam("train", TINY, "--config", tmp_path / "ddp.yaml", env=env, timeout=300, **SPEC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = read_events(proc.stdout)
    assert ev[0]["event"] == "start" and ev[0]["world_size"] == 2 and ev[-1]["event"] == "done"
    assert sum(e["event"] == "start" for e in ev) == 1  # rank 0 only reports
    # 4 unlabelled / (1 x 2 ranks) -> 2 steps per later epoch, 1 step of warm-up
    assert ev[-1]["step"] == 1 + 2 + 2 + 2
    r0 = json.loads((tmp_path / "ddp" / "ranks" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "ddp" / "ranks" / "rank1.json").read_text())
    assert r0["world_size"] == 2 and r0["step"] == r1["step"] == 7
    assert r0["ema"] == r1["ema"] and r0["student"] == r1["student"]
    assert r0["ema"] != r0["student"]
    last = ck.load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert state_hash(last["model"]) == r0["ema"] and state_hash(last["student"]) == r0["student"]
    # pseudo-labels: each rank computed those of all unlabelled cases with its final θ' (seeded
    # draws, no rank in the seed): identical on both ranks
    assert set(r0["pseudo"]) == {c for c in r0["pseudo"]} and len(r0["pseudo"]) == 4
    assert r0["pseudo"] == r1["pseudo"]
    assert len(set(r0["pseudo"].values())) == 4  # and they really differ between cases
    assert len(list((tmp_path / "ddp" / "pseudo_labels").glob("*.pt"))) == 4  # phase 2: shared out, all there
