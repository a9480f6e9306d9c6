"""Trained models usable by name (``user_models.py``, ``samliverseg models``, ``segment --model NAME``).

Real runs: a tiny random-weight SAM (registered for this module) is fine-tuned with
``samliverseg train`` on a phantom cache windowed with ``liver`` (not the base model's
``abdomen``), registered on ``done``, listed by ``samliverseg models`` and used by
``samliverseg segment --model NAME``; the output must equal a PromptEngine built by hand from
``model.pth`` with the training window. Bad input: unknown names, corrupt files, folders without
``model.json``, name clashes. The user models folder is a temporary ``$SAMLIVERSEG_MODELS``.
"""

import io
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from libtest_helpers import make_phantom_cache, save_tiny_sam, tiny_sam_fixture
from samliverseg.api import open_model
from samliverseg.automatic.unet import UNetSegmenter
from samliverseg.cli import commands as cli
from samliverseg.models import user_models as um
from samliverseg.models.build_sam import build_model
from samliverseg.interactive.engine import PromptEngine
from samliverseg.core.errors import CheckpointError, InputError
from samliverseg.core.maskutil import bbox_2d, middle_slice
from samliverseg.demo.phantom import make_phantom
from samliverseg.core.prompts import Prompts, SliceBox
from samliverseg.training.progress import ProgressWriter
from samliverseg.training.train import register_result
from samliverseg.io.volume import read_volume

TINY = "tiny_um_sam"
NAME = "tiny-liver"


tiny_model = tiny_sam_fixture(TINY)


@pytest.fixture(scope="module")
def models_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("usermodels") / "models"
    mp = pytest.MonkeyPatch()
    mp.setenv(um.MODELS_ENV, str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def trained(models_env, tmp_path_factory):
    """`samliverseg train` of a tiny decoder (1 epoch), registered on done as NAME."""
    root = tmp_path_factory.mktemp("um")
    make_phantom_cache(root, 3, (10, 64, 64), (3.0, 3.0, 5.0), seed0=20, val_fraction=0.34, seed=0, window="liver")
    weights = save_tiny_sam(root / f"{TINY}.pth", seed=9)
    cfg = root / "train.yaml"
    cfg.write_text(json.dumps(dict(cache=str(root / "cache"), output=str(root / "run-a"), base_model=TINY,
                                   checkpoint=str(weights), epochs=1, batch_size=2, lr=5e-3, max_slices_per_case=2,
                                   seed=1, device="cpu", model_name=NAME)))
    assert cli.main(["train", "--config", str(cfg)]) == 0
    ph = make_phantom((12, 64, 64), (3.0, 3.0, 5.0), seed=40, n_tumors=1)
    ct = root / "ct.nii.gz"
    sitk.WriteImage(ph.to_sitk("hu"), str(ct))
    return {"root": root, "run": root / "run-a", "weights": weights, "cfg": cfg, "ct": ct, "phantom": ph}


# ------------------------------------------------------------------------------- registration
def test_train_registers_the_model_and_models_lists_it(trained, models_env, capsys):
    entries = {m.name: m for m in um.list_user_models()}
    assert list(entries) == [NAME]
    m = entries[NAME]
    assert m.kind == "decoder" and not m.automatic and m.base_model == TINY and m.target == "liver"
    assert m.metadata["window"] == "liver" and m.best_dice is not None and m.error is None
    assert m.path == models_env / NAME / "model.pth" and (models_env / NAME / "model.json").is_file()
    assert m.source == str((trained["run"] / "model.pth").resolve())
    # a byte-identical copy of the run's export
    assert m.path.read_bytes() == (trained["run"] / "model.pth").read_bytes()
    assert "registered the model as 'tiny-liver'" in (trained["run"] / "train.log").read_text()

    capsys.readouterr()
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith(f"{NAME}:"))
    assert "decoder" in line and f"base model {TINY}" in line and "target liver" in line
    assert f"{m.best_dice:.4f}" in line and str(m.path) in out and str(models_env) in out


def test_load_user_model_gives_the_trained_weights_and_window(trained):
    loaded = um.load_user_model(NAME)
    assert loaded.kind == "decoder" and loaded.window == "liver"
    state = loaded.model.state_dict()
    saved = torch.load(trained["run"] / "model.pth", weights_only=True)["model"]
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    base = build_model(TINY, checkpoint=trained["weights"]).state_dict()
    assert any(not torch.equal(state[k], base[k]) for k in state if k.startswith("mask_decoder."))
    engine = open_model(NAME, device="cpu")  # the engine opened by name: the training cache's window
    assert isinstance(engine, PromptEngine) and engine.window.spec() == "liver" and engine.spec.name == TINY
    assert open_model(NAME, device="cpu", window="wide").window.spec() == "wide"  # unless asked otherwise
    # by path too
    assert um.load_user_model(trained["run"] / "model.pth").kind == "decoder"


def test_segment_with_the_trained_model_by_name(trained, tmp_path, capsys):
    ph, ct = trained["phantom"], trained["ct"]
    k = middle_slice(ph.liver_mask)
    i0, j0, i1, j1 = bbox_2d(ph.liver_mask[k])
    out, rep = tmp_path / "seg.nii.gz", tmp_path / "rep.json"
    rc = cli.main(["segment", str(ct), "-o", str(out), "--model", NAME, "--box-ijk", str(i0), str(j0), str(i1),
                   str(j1), str(k), "--device", "cpu", "--no-propagate", "--no-postprocess", "--report", str(rep)])
    assert rc == 0, capsys.readouterr().err
    img = sitk.ReadImage(str(out))
    assert img.GetSize() == sitk.ReadImage(str(ct)).GetSize()
    got = sitk.GetArrayFromImage(img)
    report = json.loads(rep.read_text())
    assert report["model"] == NAME and report["kind"] == "decoder" and report["window"] == "liver"
    # the same as an engine built by hand from the run's model.pth with the training window
    volume = read_volume(ct)
    prompts = Prompts(box=SliceBox.axial(i0, j0, i1, j1, k))
    want = {}
    for window in ("liver", "abdomen"):
        eng = PromptEngine(model=build_model(TINY, checkpoint=trained["run"] / "model.pth"), device="cpu", window=window)
        eng.settings.fill_holes = eng.settings.largest_component = False
        eng.set_volume(volume)
        want[window] = eng.segment(prompts, propagate=False).mask
    assert np.array_equal(got > 0, want["liver"] > 0)
    assert got[k].any()
    assert not np.array_equal(want["liver"], want["abdomen"])  # the window matters, so the check can fail


# ------------------------------------------------------------------------------- bad input
def test_unknown_name_lists_the_models(trained, tmp_path, capsys):
    rc = cli.main(["segment", str(trained["ct"]), "-o", str(tmp_path / "x.nii.gz"), "--model", "no-such-model",
                   "--box-ijk", "10", "10", "30", "30", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "no-such-model" in err and NAME in err and "lite_medsam" in err
    assert not (tmp_path / "x.nii.gz").exists()
    with pytest.raises(InputError, match=NAME):
        um.user_model_path("../etc")
    rc = cli.main(["segment", str(trained["ct"]), "-o", str(tmp_path / "x.nii.gz"), "--model", NAME,
                   "--checkpoint", str(trained["weights"]), "--box-ijk", "10", "10", "30", "30", "5"])
    assert rc == 2 and "--checkpoint" in capsys.readouterr().err


def test_corrupt_model_and_folder_without_json(trained, models_env, tmp_path, capsys):
    broken = models_env / "broken"
    broken.mkdir()
    good = (models_env / NAME / "model.pth").read_bytes()
    (broken / "model.pth").write_bytes(good[: len(good) // 3])  # truncated
    nojson = models_env / "no-json"
    nojson.mkdir()
    shutil.copyfile(models_env / NAME / "model.pth", nojson / "model.pth")
    try:
        entries = {m.name: m for m in um.list_user_models()}
        assert entries["broken"].error and "not a readable model file" in entries["broken"].error
        assert entries["no-json"].error is None and entries["no-json"].kind == "decoder"
        assert entries["no-json"].base_model == TINY and entries["no-json"].metadata == entries[NAME].metadata
        capsys.readouterr()
        assert cli.main(["models"]) == 0
        out = capsys.readouterr().out
        assert "broken: unusable:" in out and any(l.startswith("no-json: decoder") for l in out.splitlines())
        rc = cli.main(["segment", str(trained["ct"]), "-o", str(tmp_path / "y.nii.gz"), "--model", "broken",
                       "--box-ijk", "10", "10", "30", "30", "5"])
        err = capsys.readouterr().err
        assert rc == 3 and err.startswith("error: ") and "not a readable model file" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "y.nii.gz").exists()
        with pytest.raises(CheckpointError):
            um.load_user_model("broken")
        # a stale model.json (its model.pth was swapped by hand) is not trusted
        info = json.loads((models_env / NAME / "model.json").read_text())
        info["metadata"]["target"] = "tumor"
        (nojson / "model.json").write_text(json.dumps(info))
        assert {m.name: m for m in um.list_user_models()}["no-json"].target == "liver"
    finally:
        shutil.rmtree(broken)
        shutil.rmtree(nojson)


def test_register_names_replace_and_rerun(trained, models_env):
    src = trained["run"] / "model.pth"
    for bad in ("", "../up", "a b", ".hidden", "x/y", TINY, "lite_medsam", "é"):
        with pytest.raises(InputError):
            um.register_trained_model(src, name=bad)
    with pytest.raises(InputError, match="already exists"):
        um.register_trained_model(src, name=NAME)
    default = um.register_trained_model(src)  # the run folder's name
    assert default.name == "run-a" and default.kind == "decoder"
    again = um.register_trained_model(src, name="run-a", replace=True)
    assert again.path.is_file() and not [p for p in models_env.iterdir() if p.name.startswith(".")]
    junk = trained["root"] / "junk.pth"
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(CheckpointError, match="not a trained model export"):
        um.register_trained_model(junk, name="junk")
    assert not (models_env / "junk").exists()

    # train.py's registration on done: the same run again replaces, another run gets NAME-2
    pw = ProgressWriter(stream=open(os.devnull, "w"), err_stream=open(os.devnull, "w"))
    cfg = SimpleNamespace(model_name=NAME, output=str(trained["run"]))
    assert register_result(cfg, {"model": src}, pw) == NAME
    other = trained["root"] / "run-b"
    other.mkdir()
    shutil.copyfile(src, other / "model.pth")
    assert register_result(SimpleNamespace(model_name=NAME, output=str(other)), {"model": other / "model.pth"}, pw) \
        == f"{NAME}-2"
    assert um.get_user_model(f"{NAME}-2").source == str((other / "model.pth").resolve())
    shutil.rmtree(models_env / f"{NAME}-2")
    shutil.rmtree(models_env / "run-a")
    # default names come from the run folder, made valid; an invalid explicit name is a warning
    assert um.name_from("my run (2)") == "my-run-2" and um.name_from("lite_medsam") == "lite_medsam-trained"
    spaced = trained["root"] / "run c"
    spaced.mkdir()
    shutil.copyfile(src, spaced / "model.pth")
    assert register_result(SimpleNamespace(model_name=None, output=str(spaced)), {"model": spaced / "model.pth"}, pw) \
        == "run-c"
    shutil.rmtree(models_env / "run-c")
    err = io.StringIO()
    warn = ProgressWriter(stream=io.StringIO(), err_stream=err)
    assert register_result(SimpleNamespace(model_name="bad name", output=str(spaced)), {"model": src}, warn) is None
    assert "not registered" in err.getvalue() and "--register" in err.getvalue()

    # the CLI's --register
    assert cli.main(["models", "--register", str(src), "--name", "via-cli"]) == 0
    assert um.get_user_model("via-cli").kind == "decoder"
    shutil.rmtree(models_env / "via-cli")


# ------------------------------------------------------------------------------- automatic kinds
def test_automatic_kind_needs_no_prompt(trained, models_env, tmp_path, capsys):
    """A real tiny unet trained with `samliverseg train` (kind unet), used by name without prompts."""
    pytest.importorskip("samliverseg.training.unet", reason="the unet trainer is not installed")
    pytest.importorskip("samliverseg.automatic.unet", reason="the unet inference is not installed")
    cfg = tmp_path / "unet.yaml"
    cfg.write_text(json.dumps(dict(kind="unet", cache=str(trained["root"] / "cache"), output=str(tmp_path / "unet-run"),
                                   epochs=1, batch_size=1, seed=0, device="cpu", model_name="tiny-unet",
                                   unet=dict(patch_size=[8, 32, 32], channels=[4, 8], strides=[2], num_res_units=0,
                                             num_samples=1, sw_batch_size=1))))
    assert cli.main(["train", "--config", str(cfg)]) == 0, capsys.readouterr().err
    m = um.get_user_model("tiny-unet")
    assert m.kind == "unet" and m.automatic
    out = tmp_path / "auto.nii.gz"
    assert cli.main(["segment", str(trained["ct"]), "-o", str(out), "--model", "tiny-unet", "--device", "cpu"]) == 0
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert arr.shape == trained["phantom"].hu.shape and set(np.unique(arr)) <= {0, 1}
    capsys.readouterr()
    rc = cli.main(["segment", str(trained["ct"]), "-o", str(tmp_path / "z.nii.gz"), "--model", "tiny-unet",
                   "--box-ijk", "10", "10", "30", "30", "5"])
    assert rc == 2 and "takes no prompts" in capsys.readouterr().err and not (tmp_path / "z.nii.gz").exists()
    segmenter = open_model("tiny-unet", device="cpu")  # loaded once, any number of volumes
    assert isinstance(segmenter, UNetSegmenter)
    assert np.array_equal(segmenter.segment_volume(read_volume(trained["ct"])), arr)
    with pytest.raises(InputError, match="automatic"):
        um.load_user_model("tiny-unet")  # the models layer builds interactive models only
    with pytest.raises(InputError, match="--window does not apply"):
        open_model("tiny-unet", device="cpu", window="liver")
    shutil.rmtree(models_env / "tiny-unet")
