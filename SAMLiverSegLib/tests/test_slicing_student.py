"""The slicing-SAM3D student: model, Algorithm 1, trainer (kind ``student``), prompt-free inference.

Real runs (no mocks) with a tiny random-weight SAM encoder registered for this module and a
cache of three phantom cases; lite_medsam only for one short shape check when its weights are
installed.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from libtest_helpers import (make_phantom_cache, rot, save_tiny_sam, tiny_sam_fixture, torchrun_tiny_sam,
                             writer)
from samliverseg.models.build_sam import ModelSpec, build_model, find_model_checkpoint, get_spec
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.modeling.slicing_student import SlicingStudent, slab_plan, student_from_sam
from samliverseg.demo.phantom import make_phantom
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.automatic.student import (build_slicing_student, load_student, predict_probabilities, predict_volume,
                                           segment_volume)
from samliverseg.core.evaluation import dice
from samliverseg.core.geometry import resample
from samliverseg.training import checkpoint as ck
from samliverseg.training.config import config_from_dict
from samliverseg.training.progress import read_events
from samliverseg.training.student import StudentTrainer
from samliverseg.training.train import main as train_main
from samliverseg.io.volume import Volume
from samliverseg.core.windowing import apply_window

TINY = "tiny_student_sam"


SPEC = dict(normalization="minmax01")  # the tiny SAM's spec fields here (besides the common ones)


tiny_model = tiny_sam_fixture(TINY, **SPEC)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("w") / f"{TINY}.pth", seed=123)


def tiny_student(weights, slab_depth=4, hidden=8, seed=0):
    torch.manual_seed(seed)
    return build_slicing_student(TINY, checkpoint=weights, slab_depth=slab_depth, hidden=hidden)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    m = make_phantom_cache(root, 3, (10, 48, 48), (4.0, 4.0, 6.0), val_fraction=0.34, seed=0)
    assert m["summary"]["train"] == 2 and m["summary"]["val"] == 1
    return root / "cache"


def cfg_for(cache, weights, out, student=None, **kw):
    d = dict(kind="student", cache=str(cache), output=str(out), base_model=TINY, checkpoint=str(weights), epochs=2,
             batch_size=2, lr=3e-3, seed=5, device="cpu", scheduler="cosine",
             student=dict(dict(slab_depth=4, hidden=8, slabs_per_case=3, inplane_flip=True), **(student or {})))
    d.update(kw)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def trained(cache, weights, tmp_path_factory):
    """One uninterrupted run (shared by the resume and inference tests)."""
    out = tmp_path_factory.mktemp("run") / "a"
    pw, lines = writer()
    res = StudentTrainer(cfg_for(cache, weights, out), progress=pw).run()
    return {"out": out, "res": res, "events": lines.events()}


# ----------------------------------------------------------------------------- model
def test_shapes_frozen_encoder_and_modes(weights):
    st = tiny_student(weights)
    assert isinstance(st, SlicingStudent) and st.image_size == 64 and st.embed_dim == 32
    x = torch.rand(2, 1, 4, 40, 52) * 255
    st.train()
    assert not st.encoder.training and st.decoder.training  # frozen encoder stays in eval mode
    logits = st(x)
    assert logits.shape == (2, 1, 4, 40, 52)
    emb = st.embed(x[0, 0])
    assert emb.shape == (4, 32, 4, 4) and not emb.requires_grad
    native = st.decode(emb.permute(1, 0, 2, 3)[None])
    assert native.shape == (1, 1, 4, 16, 16)  # 4h x 4w
    assert st.decode(emb.permute(1, 0, 2, 3)[None], out_hw=(40, 52)).shape == (1, 1, 4, 40, 52)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, (x > 128).float())
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in st.encoder.parameters())
    grads = [p.grad for p in st.decoder.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    state = st.trainable_state()
    assert state and all(k.startswith("decoder.") for k in state)
    counts = st.parameter_counts()
    assert counts["decoder_trainable"] == sum(v.numel() for k, v in state.items() if "running" not in k)
    # the encoder is exactly the base model's, untouched
    base = build_model(TINY, checkpoint=weights).image_encoder.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in st.encoder.state_dict().items())


def test_channel_norm_decoder_is_local_instance_norm_is_not():
    """The default decoder norm pools nothing over the slab: content far away (beyond the
    receptive field) leaves a voxel's logit unchanged; with instance norm it changes it."""
    from samliverseg.modeling.slicing_student import SlabDecoder
    torch.manual_seed(0)
    a = torch.randn(1, 16, 4, 16, 16)
    b = a.clone()
    b[..., 10:] = torch.randn(1, 16, 4, 16, 6) * 3  # embedding columns 10.. differ
    for norm, local in (("channel", True), ("instance", False)):
        dec = SlabDecoder(16, 8, norm=norm).eval()
        with torch.no_grad():
            la, lb = dec(a), dec(b)
        assert la.shape == (1, 1, 4, 64, 64)
        same = torch.allclose(la[..., :24], lb[..., :24], atol=1e-5)  # native columns < 4 x (10 - 4)
        assert same is local, norm
        assert not torch.allclose(la[..., 48:], lb[..., 48:])


@pytest.mark.parametrize("normalization", ["minmax01", "sam_pixel"])
def test_preprocess_follows_the_spec_like_the_predictor(weights, normalization):
    spec = get_spec(TINY)
    sam = build_model(TINY, checkpoint=weights)
    sam.spec = ModelSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "normalization": normalization})
    st = student_from_sam(sam, slab_depth=2, hidden=8)
    img = (np.random.default_rng(0).random((64, 64)) * 200 + 20).astype(np.uint8)
    ours = st.preprocess(torch.from_numpy(img.astype(np.float32))[None])
    theirs, _ = SlicePredictor(sam, torch.device("cpu")).preprocess(img)  # square input: no resize, no pad
    assert torch.allclose(ours, theirs, atol=1e-5)
    if normalization == "minmax01":
        assert float(ours.min()) == 0.0 and abs(float(ours.max()) - 1.0) < 1e-6
    # a non-square slice is resized to the square S x S
    assert st.preprocess(torch.rand(3, 30, 70) * 255).shape == (3, 3, 64, 64)


def test_slab_plan_writes_every_slice_once():
    for depth in range(1, 30):
        for d_s in range(1, 10):
            plan = slab_plan(depth, d_s)
            count = np.zeros(depth, int)
            for start, w0, w1 in plan:
                assert start <= w0 < w1 <= start + d_s  # written slices lie in the slab
                assert start + d_s <= max(depth, d_s)  # a full slab, never past the end (bar padding)
                count[w0:w1] += 1
            assert (count == 1).all(), (depth, d_s, plan)
    assert slab_plan(11, 4) == [(0, 0, 4), (4, 4, 8), (7, 8, 11)]


def test_predict_volume_is_algorithm_1(weights):
    st = tiny_student(weights, slab_depth=4).eval()
    vol = (np.random.default_rng(1).random((11, 40, 44)) * 255).astype(np.float32)  # 11 = 2 x 4 + 3
    embedded = []
    hook = st.encoder.register_forward_hook(lambda m, inp, out: embedded.append(int(inp[0].shape[0])))
    prob = predict_volume(st, vol, batch_slices=3)
    hook.remove()
    assert sum(embedded) == 11 and max(embedded) <= 3  # each slice embedded once, 3 per encoder call
    assert prob.shape == vol.shape and prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    expected = np.zeros_like(vol)
    t = torch.from_numpy(vol)
    with torch.no_grad():
        for start, w0, w1 in [(0, 0, 4), (4, 4, 8), (7, 8, 11)]:  # the last slab overlaps by one slice
            p = torch.sigmoid(st(t[start:start + 4][None, None]))[0, 0].numpy()
            expected[w0:w1] = p[w0 - start:w1 - start]
    assert np.allclose(prob, expected, atol=1e-5)
    # the overlapped slice 7 comes from the second slab, not the third
    with torch.no_grad():
        third = torch.sigmoid(st(t[7:11][None, None]))[0, 0, 0].numpy()
    assert not np.allclose(prob[7], third, atol=1e-6)

    # a geometric augmentation with its inverse, called once per slab
    calls = []

    def flip_i(slab):
        calls.append(tuple(slab.shape))
        return torch.flip(slab, dims=[-1]), lambda logits: torch.flip(logits, dims=[-1])

    aug = predict_volume(st, vol, augment=flip_i)
    assert calls == [(1, 1, 4, 40, 44)] * 3
    with torch.no_grad():
        want = torch.sigmoid(torch.flip(st(torch.flip(t[7:11], dims=[-1])[None, None]), dims=[-1]))[0, 0].numpy()
    assert np.allclose(aug[8:11], want[1:], atol=1e-5)
    # a volume thinner than a slab is padded, the padding dropped
    assert predict_volume(st, vol[:3]).shape == (3, 40, 44)
    with pytest.raises(CancelledError):
        predict_volume(st, vol, cancel=lambda: True)


@pytest.mark.skipif(find_model_checkpoint("lite_medsam") is None, reason="LiteMedSAM weights not installed")
def test_lite_medsam_encoder_shapes():
    st = build_slicing_student("lite_medsam", slab_depth=2, hidden=16)
    assert st.normalization == "minmax01" and st.image_size == 256
    emb = st.embed(torch.rand(2, 96, 80) * 255)
    assert emb.shape == (2, 256, 64, 64)
    assert st.decode(emb.permute(1, 0, 2, 3)[None]).shape == (1, 1, 2, 256, 256)


# ----------------------------------------------------------------------------- trainer
def test_trainer_end_to_end_and_events(trained, weights):
    ev, res, out = trained["events"], trained["res"], trained["out"]
    names = [e["event"] for e in ev]
    assert res["status"] == "done" and names[0] == "start" and names[-1] == "done"
    start = ev[0]
    assert start["kind"] == "student" and start["train_cases"] == 2 and start["val_cases"] == 1
    assert start["slabs_per_epoch"] == 6 and start["decoder_trainable"] > 0 and start["encoder_frozen"] > 0
    assert names.count("step") == 6 and res["step"] == 6  # 2 cases x 3 slabs / batch 2 = 3 steps x 2 epochs
    assert names.count("epoch") == 2 and names.count("validation") == 2
    assert all(np.isfinite(e["loss"]) for e in ev if e["event"] == "step")
    assert {"last", "best", "model"} <= {e["which"] for e in ev if e["event"] == "checkpoint"}
    emb = sorted((out / "embeddings").glob("*.pt"))
    assert len(emb) == 3  # one file per case (2 train + 1 val)
    d = torch.load(emb[0], weights_only=True)
    assert d["features"].dtype == torch.float16 and d["features"].shape[1:] == (32, 4, 4)
    assert d["features_flip"].shape == d["features"].shape and d["target"].shape[1:] == (16, 16)
    meta = torch.load(out / "model.pth", weights_only=True)["metadata"]
    assert meta["kind"] == "student" and meta["encoder"] == TINY and meta["slab_depth"] == 4 and meta["hidden"] == 8
    assert meta["window"] == "abdomen" and meta["target"] == "liver" and meta["label_meaning"].startswith("label > 0")
    st, _ = load_student(out / "model.pth")
    assert st.slab_depth == 4 and not st.training
    # training changed the decoder relative to its seeded initial state
    init = tiny_student(weights, slab_depth=4, hidden=8, seed=5).trainable_state()  # as the trainer seeds it
    last = ck.load_checkpoint(out / "last.pt")["model"]
    assert any(not torch.allclose(last[k], init[k]) for k in init)


@pytest.mark.parametrize("stop_at", [2, 3])
def test_resume_reaches_same_weights(trained, cache, weights, tmp_path, stop_at):
    out = tmp_path / "b"
    pw1, o1 = writer()
    first = StudentTrainer(cfg_for(cache, weights, out), progress=pw1)
    with pytest.raises(CancelledError):
        first.run(cancel=lambda: first.step >= stop_at)
    assert o1.events()[-1]["event"] == "cancelled" and o1.events()[-1]["step"] == stop_at
    emb = sorted((out / "embeddings").glob("*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in emb]
    pw2, o2 = writer()
    res = StudentTrainer(cfg_for(cache, weights, out), progress=pw2).run(resume=True)
    assert res["step"] == 6 and o2.events()[0]["resumed"] is True
    assert [p.stat().st_mtime_ns for p in emb] == mtimes  # embeddings reused, not recomputed
    a = ck.load_checkpoint(trained["out"] / "last.pt")["model"]
    b = ck.load_checkpoint(out / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert ck.load_checkpoint(out / "last.pt")["best_dice"] == pytest.approx(trained["res"]["best_dice"])


def test_seed_changes_run_and_bad_resume(trained, cache, weights, tmp_path):
    out = tmp_path / "c"
    StudentTrainer(cfg_for(cache, weights, out, epochs=1, seed=6, student={"inplane_flip": False}),
                   progress=writer()[0]).run()
    a = ck.load_checkpoint(trained["out"] / "last.pt")["model"]
    b = ck.load_checkpoint(out / "last.pt")["model"]
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="student.slab_depth"):
        StudentTrainer(cfg_for(cache, weights, out, student={"inplane_flip": False, "slab_depth": 3}),
                       progress=writer()[0]).run(resume=True)
    with pytest.raises(CheckpointError, match="target"):
        StudentTrainer(cfg_for(cache, weights, out, target="tumor", student={"inplane_flip": False}),
                       progress=writer()[0]).run(resume=True)


def test_options_validation(cache, weights, tmp_path):
    with pytest.raises(InputError, match="student.slab_deep"):
        cfg_for(cache, weights, tmp_path, student={"slab_deep": 3})
    with pytest.raises(InputError, match="student.hidden"):
        cfg_for(cache, weights, tmp_path, student={"hidden": 6})
    with pytest.raises(InputError, match="student.cache_dtype"):
        cfg_for(cache, weights, tmp_path, student={"cache_dtype": "int8"})
    opts = cfg_for(cache, weights, tmp_path, student={"slice_margin": 2}).options()
    assert opts.slice_margin == 2 and opts.depth_flip is True


def test_cli_train_kind_student(cache, weights, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps(dict(kind="student", cache=str(cache), output="run", base_model=TINY,
                                   checkpoint=str(weights), epochs=1, batch_size=2, device="cpu",
                                   student=dict(slab_depth=3, hidden=4, slabs_per_case=1, cache_dtype="float32",
                                                slice_margin=1))))
    assert train_main(["--config", str(cfg)]) == 0
    ev = read_events(capsys.readouterr().out)
    assert ev[0]["event"] == "start" and ev[-1]["event"] == "done"
    files = sorted((tmp_path / "run" / "embeddings").glob("*.pt"))
    assert len(files) == 3
    for f in files:  # slice_margin 1: the target's k-range +- 1 slice
        d = torch.load(f, weights_only=True)
        assert d["features"].dtype == torch.float32 and "features_flip" not in d
        with np.load(cache / "cases" / f"{d['case_id']}.npz") as z:
            ks = np.nonzero((z["label"] > 0).any(axis=(1, 2)))[0]
            depth = z["label"].shape[0]
        k0, k1 = max(0, ks[0] - 1), min(depth, ks[-1] + 2)
        assert d["k0"] == k0 and d["features"].shape[0] == k1 - k0


# ----------------------------------------------------------------------------- inference
def _oblique_volume(seed=3):
    p = make_phantom((14, 44, 40), (3.5, 4.0, 6.0), seed=seed, n_tumors=1)
    direction = rot("z", 25) @ rot("x", 10) @ np.diag([-1.0, 1.0, 1.0])
    vol = Volume(array=p.hu.astype(np.float32), spacing=(3.5, 4.0, 6.0), origin=(-20.0, 15.0, 7.0),
                 direction=direction)
    return vol, p.labels


def test_segment_volume_on_the_input_grid(trained):
    vol, _ = _oblique_volume()
    model = trained["out"] / "model.pth"
    mask = segment_volume(model, vol, device="cpu")
    assert mask.shape == vol.array.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    st, meta = load_student(model)
    grey = apply_window(vol.array, meta["window"]).astype(np.float32)
    assert np.array_equal(mask, (predict_volume(st, grey) > 0.5).astype(np.uint8))


def test_resampling_model_maps_back_to_the_input_grid(trained, tmp_path):
    vol, labels = _oblique_volume()
    obj = torch.load(trained["out"] / "model.pth", weights_only=True)
    obj["metadata"]["spacing"] = [2.0, 2.5, 4.0]
    path = tmp_path / "model.pth"
    torch.save(obj, path)
    st, meta = load_student(path)
    prob = predict_probabilities(st, meta, vol)
    assert prob.shape == vol.array.shape and prob.dtype == np.float32
    assert segment_volume(path, vol, device="cpu").shape == vol.array.shape
    # the two grid changes used there are inverse to each other on an oblique, flipped grid
    liver = (labels > 0).astype(np.float32)
    fine, grid = resample(liver, vol.grid, meta["spacing"])
    assert grid.direction == vol.grid.direction and grid.shape_ijk[0] > vol.array.shape[2]
    back = resample(fine, grid, vol.grid).array > 0.5
    d = dice(back, liver > 0.5)
    assert d > 0.97, d


def test_other_kind_is_a_checkpoint_error(trained, tmp_path):
    vol, _ = _oblique_volume()
    obj = torch.load(trained["out"] / "model.pth", weights_only=True)
    obj["metadata"]["kind"] = "semi"  # a Semi-SAM+ student: the same architecture, accepted
    torch.save(obj, tmp_path / "semi.pth")
    assert segment_volume(tmp_path / "semi.pth", vol, device="cpu").shape == vol.array.shape
    p = tmp_path / "unet.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "metadata": {"kind": "unet"}}, p)
    with pytest.raises(CheckpointError, match="'unet'.*expected kind 'student' or 'semi'"):
        segment_volume(p, vol, device="cpu")
    q = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, q)
    with pytest.raises(CheckpointError, match="expected a model of kind 'student' or 'semi'"):
        segment_volume(q, vol, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        segment_volume(tmp_path / "missing.pth", vol, device="cpu")


# ----------------------------------------------------------------------------- DDP
def test_ddp_two_ranks_equal_gradient_accumulation(cache, weights, tmp_path):
    """torchrun, 2 CPU ranks (gloo) with batch 1 each == one process with batch 1 and grad_accum 2:
    the same slabs in the same order (the epoch plan is drawn per global batch), and DDP's
    gradient average equals the accumulated mean. (Against one process with batch 2 the result
    is the same in exact arithmetic but not bit for bit: the float32 rounding of a batch-2
    convolution differs, and Adam's first steps, lr x sign(g), magnify it where g is ~0.)"""
    import os
    cfg = cfg_for(cache, weights, tmp_path / "ddp", batch_size=1).to_dict()
    (tmp_path / "ddp.yaml").write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = torchrun_tiny_sam("train", TINY, "--config", tmp_path / "ddp.yaml", env=env, timeout=300, **SPEC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = read_events(proc.stdout)
    assert ev[0]["event"] == "start" and ev[0]["world_size"] == 2 and ev[-1]["event"] == "done"
    assert sum(e["event"] == "start" for e in ev) == 1  # rank 0 only reports
    assert ev[-1]["step"] == 6 and ev[0]["slabs_per_epoch"] == 6
    single = StudentTrainer(cfg_for(cache, weights, tmp_path / "one", batch_size=1, grad_accum=2),
                            progress=writer()[0])
    assert single.run()["step"] == 6
    a = ck.load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    b = ck.load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)
    assert (tmp_path / "ddp" / "model.pth").exists()
