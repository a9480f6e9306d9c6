"""The one model registry (``models.registry``) and ``api.open_model``: every family of model is
listed by one function and opened by one function, with the CPU fallback decided in one place.

Tiny random configurations only: their weights are written to temporary files and opened as a
user would (a built-in 2D model with ``checkpoint=``, a SAM-Med3D model with ``checkpoint=``,
trained models registered in a temporary user models folder).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from libtest_helpers import build_tiny_sam, save_tiny_sam, tiny_sam_spec
from samliverseg.api import CPU_FALLBACK_NOTE, call_with_cpu_fallback, cpu_fallback_note, open_model
from samliverseg.automatic.student import StudentSegmenter
from samliverseg.automatic.unet import MODEL_KIND as UNET_KIND
from samliverseg.automatic.unet import UNetModel, UNetSegmenter
from samliverseg.cli import commands as cli
from samliverseg.core.errors import CheckpointError, InputError
from samliverseg.demo.phantom import make_phantom
from samliverseg.interactive.engine import PromptEngine
from samliverseg.interactive.engine3d import Sam3DEngine
from samliverseg.modeling.adapters import AdapterConfig, apply_adapters
from samliverseg.modeling.slicing_student import student_from_sam, student_metadata
from samliverseg.models import user_models as um
from samliverseg.models.adapters import save_adapted_model
from samliverseg.models.build_sam import ModelSpec, build_model, register_model, unregister_model
from samliverseg.models.build_sam3d import build_sam_med3d_tiny
from samliverseg.models.registry import find_model, list_models

TINY = "tiny_registry_sam"
#: Every model README names.
README_MODELS = ("lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam", "sam_med3d", "sam_med3d_turbo")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny 2D model with weights, a tiny SAM-Med3D with weights, and one trained model of each
    of the kinds decoder, adapter, unet, student registered in a temporary user models folder."""
    root = tmp_path_factory.mktemp("zoo")
    mp = pytest.MonkeyPatch()
    mp.setenv(um.MODELS_ENV, str(root / "models"))
    register_model(tiny_sam_spec(TINY), replace=True)
    weights = save_tiny_sam(root / f"{TINY}.pth", seed=0)
    weights3d = root / "sam_med3d_tiny.pth"
    torch.save(build_sam_med3d_tiny().state_dict(), weights3d)

    def register(name, obj):
        (root / name).mkdir()
        torch.save(obj, root / name / "model.pth")
        um.register_trained_model(root / name / "model.pth", name=name)

    sam = build_model(TINY, checkpoint=weights)
    register("zoo-decoder", {"model": sam.state_dict(), "metadata": {"kind": "decoder", "base_model": TINY,
                                                                     "window": "liver", "target": "liver"}})
    adapted = apply_adapters(build_model(TINY, checkpoint=weights), AdapterConfig())
    (root / "zoo-adapter").mkdir()
    save_adapted_model(adapted, root / "zoo-adapter" / "model.pth", base_model=TINY, base_checkpoint=weights,
                       metadata={"window": "liver"})
    um.register_trained_model(root / "zoo-adapter" / "model.pth", name="zoo-adapter")
    network = {"channels": [2, 4], "strides": [2], "num_res_units": 0, "dropout": 0.0, "act": "relu",
               "kernel_size": 3}
    register("zoo-unet", {"model": UNetModel(network).state_dict(), "metadata": {
        "kind": UNET_KIND, "network": network, "patch_size": [8, 16, 16], "sw_batch_size": 1, "overlap": 0.25,
        "window": "liver", "spacing": None, "largest_component": False, "target": "liver"}})
    student = student_from_sam(sam, slab_depth=2, hidden=8)
    register("zoo-student", {"model": student.state_dict(),
                             "metadata": dict(student_metadata(student), window="liver", spacing=None)})
    yield {"root": root, "weights": weights, "weights3d": weights3d}
    unregister_model(TINY)
    mp.undo()


def test_models_lists_every_model_through_the_one_listing(zoo, capsys):
    rows = list_models()
    names = [r.name for r in rows]
    assert set(README_MODELS) <= set(names) and "sam_med3d_tiny" not in names  # a test configuration: hidden
    assert {"zoo-decoder", "zoo-adapter", "zoo-unet", "zoo-student"} <= set(names)
    by = {r.name: r for r in rows}
    assert by["sam_med3d_turbo"].family == "sam3d" and by["sam_med3d_turbo"].interactive
    assert "sam_med3d_turbo.pth" in by["sam_med3d_turbo"].where and not by["sam_med3d_turbo"].present
    assert by["sam_vit_b"].family == "sam2d" and by["lite_medsam"].default
    assert (by["zoo-unet"].family, by["zoo-unet"].interactive, by["zoo-unet"].trained) == ("unet", False, True)
    assert (by["zoo-adapter"].family, by["zoo-adapter"].interactive) == ("adapter", True)
    assert "sam_med3d_tiny" in [r.name for r in list_models(include_hidden=True)]

    capsys.readouterr()
    assert cli.main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed["models"]] == names  # the CLI prints the one listing, in its order
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in README_MODELS:
        assert any(line.startswith(f"{name}") and ":" in line for line in out.splitlines()), name
    assert any(line.startswith("zoo-unet: unet (automatic") for line in out.splitlines())


def test_open_model_gives_the_object_of_each_family(zoo):
    vol = make_phantom((8, 32, 32), (4.0, 4.0, 5.0), seed=3, n_tumors=0).to_volume()
    engine = open_model(TINY, checkpoint=str(zoo["weights"]), device="cpu")
    assert type(engine) is PromptEngine and engine.window.spec() == "abdomen"

    decoder = open_model("zoo-decoder", device="cpu")
    assert type(decoder) is PromptEngine and decoder.window.spec() == "liver"  # its training cache's window
    adapter = open_model("zoo-adapter", device="cpu")
    assert type(adapter) is PromptEngine and adapter.model.adapter_metadata["kind"] == "adapter"

    engine3d = open_model("sam_med3d_tiny", checkpoint=str(zoo["weights3d"]), device="cpu")
    assert type(engine3d) is Sam3DEngine and engine3d.spec.name == "sam_med3d_tiny"
    with pytest.raises(InputError, match="--window does not apply"):
        open_model("sam_med3d_tiny", checkpoint=str(zoo["weights3d"]), device="cpu", window="liver")

    unet = open_model("zoo-unet", device="cpu")
    assert type(unet) is UNetSegmenter
    first = unet.segment_volume(vol)  # loaded once, used twice: the same answer
    assert first.shape == vol.array.shape and first.dtype == np.uint8
    assert np.array_equal(unet.segment_volume(vol), first)
    student = open_model("zoo-student", device="cpu")
    assert type(student) is StudentSegmenter and student.kind == "student"
    assert student.segment_volume(vol).shape == vol.array.shape

    with pytest.raises(InputError, match="own weights"):
        open_model("zoo-decoder", checkpoint=str(zoo["weights"]), device="cpu")
    with pytest.raises(InputError, match="unknown model 'nope'.*sam_med3d_turbo.*zoo-unet"):
        open_model("nope", device="cpu")


def test_unusable_trained_model_and_names_taken_by_any_family(zoo):
    broken = zoo["root"] / "models" / "zoo-broken"
    broken.mkdir()
    (broken / "model.pth").write_bytes(b"not a torch file")
    try:
        row = {r.name: r for r in list_models()}["zoo-broken"]
        assert not row.present and "not a readable model file" in row.info["error"]
        with pytest.raises(CheckpointError, match="not a readable model file"):
            open_model("zoo-broken", device="cpu")
    finally:
        broken.joinpath("model.pth").unlink()
        broken.rmdir()
    for taken in ("sam_med3d", "lite_medsam"):  # a trained model never shadows a built-in one of any family
        with pytest.raises(InputError, match="built-in model"):
            um.validate_name(taken)
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec(name="sam_med3d_turbo", description="a clash", builder=build_tiny_sam,
                                 checkpoint_filename="x.pth"))
    assert find_model("sam_med3d_turbo").family == "sam3d"


def test_download_answers_for_every_family(zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAMLIVERSEG_CACHE", str(tmp_path))  # an empty weights cache
    capsys.readouterr()
    assert cli.main(["download", "sam_med3d_turbo"]) == 3  # never downloaded: where to get it
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sam_med3d_turbo.pth" in err and "huggingface.co" in err
    assert cli.main(["download", "zoo-unet"]) == 2 and "trained model" in capsys.readouterr().err
    assert cli.main(["download", "nope"]) == 2 and "sam_med3d" in capsys.readouterr().err


def test_cpu_fallback_decision_with_a_real_cuda_oom():
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert cpu_fallback_note(oom, "cuda") == CPU_FALLBACK_NOTE
    assert cpu_fallback_note(oom, "cuda:1") == CPU_FALLBACK_NOTE
    assert cpu_fallback_note(oom, "cpu") is None  # already on the CPU: nothing to fall back to
    assert cpu_fallback_note(RuntimeError("DefaultCPUAllocator: can't allocate memory"), "cuda") is None
    assert cpu_fallback_note(ValueError("bad input"), "cuda") is None

    seen, notes = [], []

    def job(device):
        seen.append(device)
        if device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return "done on " + device

    assert call_with_cpu_fallback(job, "cuda", notes) == "done on cpu"
    assert seen == ["cuda", "cpu"] and notes == [CPU_FALLBACK_NOTE]

    def failing(device):
        seen.append(device)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    seen.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # once only: the CPU's failure is the user's
        call_with_cpu_fallback(failing, "cuda", [])
    assert seen == ["cuda", "cpu"]
    seen.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        call_with_cpu_fallback(failing, "cpu", [])
    assert seen == ["cpu"]
