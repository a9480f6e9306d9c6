"""Encoder/decoder backends (``samliverseg.interactive.backends``): ONNX Runtime and OpenVINO
against torch with the real LiteMedSAM weights, the on-disk cache of converted models (reused;
corrupt or stale entries rebuilt), the self-check that rejects a wrong converted model, pinned
precision, fine-tunes and adapters, the one-line fallback when a package is missing (a real
failed import in a subprocess) and the CLI's ``--backend`` / ``--report``.

Converted models go to a temporary cache folder of this module (``SAMLIVERSEG_CACHE``).
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samliverseg.core.maskutil import bbox_2d, middle_slice
from samliverseg.core.windowing import apply_window, get_window
from samliverseg.demo.phantom import make_phantom
from samliverseg.interactive.backends import check_slice, exported, store
from samliverseg.core.errors import InputError
from samliverseg.interactive.backends import select
from samliverseg.interactive.backends.select import entry_key, open_backend
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.modeling import MaskDecoder, PromptEncoder, SamModel, TinyViT, TwoWayTransformer
from samliverseg.models.build_sam import ModelSpec, build_model

#: Installed exported backends, in the order ``auto`` tries them.
FAST = [n for n in exported.FAST_BACKENDS if importlib.util.find_spec(n) and importlib.util.find_spec("onnx")]
needs_fast = pytest.mark.skipif(not FAST, reason="neither onnxruntime nor openvino (with onnx) is installed")


@pytest.fixture(scope="module", autouse=True)
def converted_cache(tmp_path_factory):
    old = os.environ.get("SAMLIVERSEG_CACHE")
    path = tmp_path_factory.mktemp("backend_cache")
    os.environ["SAMLIVERSEG_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SAMLIVERSEG_CACHE", None)
    else:
        os.environ["SAMLIVERSEG_CACHE"] = old


def tiny_litemedsam(seed=0):
    """LiteMedSAM's architecture (TinyViT + SAM prompt encoder / decoder), tiny and random: 64 px in."""
    torch.manual_seed(seed)
    model = SamModel(
        image_encoder=TinyViT(img_size=64, embed_dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2),
                              window_sizes=(7, 7, 7, 7), out_chans=32),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(64, 64),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_hidden_dim=32,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2)),
    )
    for m in model.modules():  # random BatchNorm statistics, so that the folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.normal_(1, 0.1)
    model.spec = ModelSpec(name="tiny_litemedsam", description="tiny random LiteMedSAM", builder=lambda: model,
                           checkpoint_filename="none.pth", image_size=64, normalization="minmax01",
                           embedding_size=16, window="abdomen")
    return model.eval()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def dice(a, b):
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def entries():
    root = store.backends_dir()
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((24, 128, 128), (2.0, 2.0, 4.0), seed=3, n_tumors=1)


# -- the real LiteMedSAM weights ------------------------------------------------------------------

@pytest.mark.slow
@needs_fast
@pytest.mark.parametrize("name", FAST)
def test_backend_matches_torch_with_the_real_weights(name, phantom):
    model = build_model("lite_medsam")
    eager = SlicePredictor(model, "cpu", backend="torch")
    notes = []
    fast = SlicePredictor(model, "cpu", backend=name, notify=notes.append)
    assert fast.backend.name == name and fast.backend.precision == "fp32", notes
    assert fast.backend.describe()["decoder"] == name
    window = get_window("abdomen")
    k0 = middle_slice(phantom.liver_mask)
    for k in (k0 - 3, k0, k0 + 3):
        img = apply_window(phantom.hu[k], window)
        liver = phantom.liver_mask[k]
        x0, y0, x1, y1 = bbox_2d(liver)
        box = (x0 - 3, y0 - 3, x1 + 3, y1 + 3)
        e0, e1 = eager.embed(img, (2.0, 2.0)), fast.embed(img, (2.0, 2.0))
        assert e1.features.dtype == torch.float32 and e1.features.shape == e0.features.shape
        assert rel(e1.features, e0.features) < 1e-4
        m0 = eager.predict(e0, box=box, multimask_output=False).masks[0]
        m1 = fast.predict(e1, box=box, multimask_output=False).masks[0]
        assert m0.sum() > 100 and dice(m1, m0) >= 0.99
        p0 = eager.predict(e0, point_coords=np.array([[(x0 + x1) / 2, (y0 + y1) / 2]]), point_labels=np.array([1]))
        p1 = fast.predict(e1, point_coords=np.array([[(x0 + x1) / 2, (y0 + y1) / 2]]), point_labels=np.array([1]))
        assert np.allclose(p1.scores, p0.scores, atol=1e-3)


def openvino_bf16() -> bool:
    if "openvino" not in FAST:
        return False
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.slow
@pytest.mark.skipif(not openvino_bf16(), reason="OpenVINO with a CPU that has bf16 natively is needed")
def test_bf16_decoder_agrees_with_fp32_with_the_real_weights(phantom):
    """The opt-in bf16 decoder on the real weights: the same masks as fp32 within 1 %, from one embedding."""
    model = build_model("lite_medsam")
    fp32 = SlicePredictor(model, "cpu", backend="openvino")
    bf16 = SlicePredictor(model, "cpu", backend="openvino", decoder_precision="bf16")
    assert bf16.backend.decoder_precision == "bf16" and fp32.backend.decoder_precision == "fp32"
    window = get_window("abdomen")
    k0 = middle_slice(phantom.liver_mask)
    for k in (k0 - 3, k0, k0 + 3):
        emb = fp32.embed(apply_window(phantom.hu[k], window), (2.0, 2.0))
        x0, y0, x1, y1 = bbox_2d(phantom.liver_mask[k])
        a = fp32.predict(emb, box=(x0 - 3, y0 - 3, x1 + 3, y1 + 3), multimask_output=False)
        b = bf16.predict(emb, box=(x0 - 3, y0 - 3, x1 + 3, y1 + 3), multimask_output=False)
        assert a.masks[0].sum() > 100 and dice(b.masks[0], a.masks[0]) >= 0.99
        assert not np.array_equal(a.low_res_logits.numpy(), b.low_res_logits.numpy())  # it did run bf16
        assert np.allclose(b.scores, a.scores, atol=0.02)


# -- the cache of converted models ---------------------------------------------------------------

@needs_fast
def test_cache_is_reused_and_corrupt_or_stale_entries_are_rebuilt():
    name = FAST[-1]
    model = tiny_litemedsam(1)
    notes = []
    first = SlicePredictor(model, "cpu", backend=name, notify=notes.append).backend
    assert first.name == name and first.conversion_s is not None
    assert any("converting the image encoder" in n for n in notes)
    made = [e for e in entries() if name in e and e.endswith("fp32")]
    enc = next(store.backends_dir() / e for e in made if e.startswith("encoder-"))
    stamp = {p.name: p.stat().st_mtime_ns for p in enc.iterdir()}

    notes.clear()
    again = SlicePredictor(model, "cpu", backend=name, notify=notes.append).backend
    assert again.name == name and again.conversion_s is None and notes == []
    assert {p.name: p.stat().st_mtime_ns for p in enc.iterdir() if p.name in stamp} == stamp

    x = SlicePredictor(model, "cpu").preprocess(check_slice(64))[0]
    want = first.encode(x)
    # corrupt: a converted file altered on disk (same size, other bytes)
    data = next(p for p in enc.iterdir() if p.suffix in (".onnx", ".bin"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    data.write_bytes(bytes(raw))
    notes.clear()
    rebuilt = SlicePredictor(model, "cpu", backend=name, notify=notes.append).backend
    assert rebuilt.name == name and rebuilt.conversion_s is not None
    assert any("does not match its recorded size and SHA-256" in n for n in notes), notes
    assert rel(rebuilt.encode(x), want) < 1e-5

    # stale: the entry says it was made by another version of the backend
    meta = json.loads((enc / "meta.json").read_text())
    meta["key"]["backend_version"] = "0.0.1"
    (enc / "meta.json").write_text(json.dumps(meta))
    notes.clear()
    rebuilt = SlicePredictor(model, "cpu", backend=name, notify=notes.append).backend
    assert rebuilt.conversion_s is not None and any("stale (backend_version" in n for n in notes), notes
    assert json.loads((enc / "meta.json").read_text())["key"]["backend_version"] == rebuilt.version

    # unreadable meta
    (enc / "meta.json").write_text("{not json")
    notes.clear()
    assert SlicePredictor(model, "cpu", backend=name, notify=notes.append).backend.conversion_s is not None
    assert any("unreadable" in n for n in notes), notes


@needs_fast
def test_auto_self_check_rejects_a_wrong_converted_model():
    """A converted file that loads fine but computes something else (here: another model's encoder,
    a real exported file under this model's key) fails the self-check and is not used."""
    name = FAST[0]  # the one auto tries first
    module = exported.import_backend(name)
    model, other = tiny_litemedsam(2), tiny_litemedsam(3)
    x = SlicePredictor(model, "cpu").preprocess(check_slice(64))[0]

    def plant():
        key = entry_key(model, "encoder", name, exported.backend_version(module), "fp32", 64)
        build = store.new_build_dir()
        exported.export_onnx(other, "encoder", (x,), build / "export.onnx")
        exported.convert(name, module, build / "export.onnx", build)
        store.write_entry(build, key)
        return store.commit(build, key)

    folder = plant()
    notes = []
    chosen = SlicePredictor(model, "cpu", backend="auto", notify=notes.append).backend
    assert chosen.name != name
    assert any(f"{name}'s image encoder differs from torch on the self-check" in n for n in notes), notes
    with torch.no_grad():
        assert rel(chosen.encode(x), model.image_encoder(x)) < 1e-4
    assert not folder.exists() or store.read_meta(folder)["self_check"]["passed"]

    plant()  # asked for by name: torch, with one line
    notes.clear()
    explicit = SlicePredictor(model, "cpu", backend=name, notify=notes.append).backend
    assert explicit.name == "torch" and len(notes) == 1 and notes[0].endswith("; using torch"), notes


@pytest.mark.skipif("openvino" not in FAST, reason="openvino (with onnx) is not installed")
def test_openvino_precision_is_pinned():
    model = tiny_litemedsam(4)
    import openvino

    f32, bf16_type = openvino.Type.f32, openvino.Type.bf16
    fp32 = SlicePredictor(model, "cpu", "fp32", backend="openvino").backend
    assert fp32.name == "openvino" and fp32.precision == "fp32"
    assert fp32.encoder.compiled.get_property("INFERENCE_PRECISION_HINT") == f32
    assert fp32.decoder.compiled.get_property("INFERENCE_PRECISION_HINT") == f32

    notes = []
    bf16 = SlicePredictor(model, "cpu", "bf16", backend="openvino", notify=notes.append).backend
    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert bf16.name == "openvino" and bf16.precision == "bf16"
        assert bf16.encoder.compiled.get_property("INFERENCE_PRECISION_HINT") == bf16_type
        assert bf16.decoder.compiled.get_property("INFERENCE_PRECISION_HINT") == f32
        auto = SlicePredictor(model, "cpu", "auto", backend="openvino").backend
        assert auto.precision == "bf16"
    else:
        assert bf16.name == "torch" and bf16.precision == "bf16" and "natively" in notes[0]


@pytest.mark.skipif("openvino" not in FAST, reason="openvino (with onnx) is not installed")
def test_decoder_precision_is_an_opt_in_pinned_per_part():
    """decoder_precision=bf16: the decoder compiled bf16 (the encoder keeps its own precision) where the
    CPU has bf16 natively, its self-check recorded against the bf16 tolerance; elsewhere fp32 and one note."""
    model = tiny_litemedsam(4)
    import openvino

    f32, bf16_type = openvino.Type.f32, openvino.Type.bf16
    notes = []
    b = SlicePredictor(model, "cpu", "fp32", backend="openvino", notify=notes.append, decoder_precision="bf16").backend
    assert b.name == "openvino" and b.precision == "fp32"
    assert b.encoder.compiled.get_property("INFERENCE_PRECISION_HINT") == f32
    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert b.decoder_precision == "bf16" and b.describe()["decoder_precision"] == "bf16"
        assert b.decoder.compiled.get_property("INFERENCE_PRECISION_HINT") == bf16_type
        assert not any("decoder runs" in n for n in notes), notes
        key = entry_key(model, "decoder", "openvino", exported.backend_version(openvino), "bf16", 64)
        check = store.read_meta(store.entry_dir(key))["self_check"]
        assert check["passed"] and check["tolerance"] == select.DECODER_TOLERANCE["bf16"] and check["relative_l2"] > 0
    else:
        assert b.decoder_precision == "fp32" and b.decoder.compiled.get_property("INFERENCE_PRECISION_HINT") == f32
        assert [n for n in notes if "decoder runs fp32" in n and "native bf16" in n], notes
    assert SlicePredictor(model, "cpu", backend="openvino").backend.describe()["decoder_precision"] == "fp32"


@pytest.mark.parametrize("name", ["torch"] + [n for n in FAST if n == "onnxruntime"])
def test_a_bf16_decoder_elsewhere_stays_fp32_with_one_note(name):
    notes = []
    b = SlicePredictor(tiny_litemedsam(5), "cpu", backend=name, notify=notes.append, decoder_precision="bf16").backend
    assert b.name == name and b.decoder_precision == "fp32" and b.describe()["decoder_precision"] == "fp32"
    said = [n for n in notes if "decoder" in n and not n.startswith("convert")]  # (a conversion says so too)
    assert len(said) == 1 and f"decoder runs fp32 on {name}" in said[0] and "OpenVINO" in said[0], notes
    assert b.notes == said  # recorded in the backend (a report's backend_info)
    with pytest.raises(InputError, match="decoder precision"):
        open_backend(tiny_litemedsam(5), "cpu", "torch", decoder_precision="fp16")


@pytest.mark.skipif("onnxruntime" not in FAST, reason="onnxruntime (with onnx) is not installed")
def test_onnxruntime_is_fp32_only_and_gpus_keep_torch():
    model = tiny_litemedsam(5)
    notes = []
    b = SlicePredictor(model, "cpu", "bf16", backend="onnxruntime", notify=notes.append).backend
    assert b.name == "torch" and b.precision == "bf16" and len(notes) == 1 and "bf16" in notes[0]
    assert SlicePredictor(model, "cpu", "auto", backend="onnxruntime").backend.precision == "fp32"
    notes.clear()
    b = open_backend(model, "meta", "onnxruntime", "fp32", torch.zeros(1, 3, 64, 64), notes.append)
    assert b.name == "torch" and "CPU only" in notes[0]
    notes.clear()
    assert open_backend(model, "meta", "auto", "fp32", torch.zeros(1, 3, 64, 64), notes.append).name == "torch"
    assert notes == []  # auto on a GPU: torch, nothing to say


# -- trained models -------------------------------------------------------------------------------

@pytest.mark.skipif("onnxruntime" not in FAST, reason="onnxruntime (with onnx) is not installed")
def test_decoder_fine_tune_goes_through_the_backend_and_adapters_fall_back():
    base = tiny_litemedsam(6)
    SlicePredictor(base, "cpu", backend="onnxruntime").backend  # noqa: B018 (converts the base)
    tuned = copy.deepcopy(base)
    tuned.spec = base.spec
    with torch.no_grad():
        for p in tuned.mask_decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    notes = []
    pred = SlicePredictor(tuned, "cpu", backend="onnxruntime", notify=notes.append)
    assert pred.backend.name == "onnxruntime"
    converted = [n for n in notes if n.startswith("converting")]
    assert len(converted) == 1 and "mask decoder" in converted[0]  # the encoder's entry is the base's
    eager = SlicePredictor(tuned, "cpu", backend="torch")
    img = check_slice(64)
    e = pred.embed(img)
    got = pred.predict(e, box=(10, 12, 40, 44), multimask_output=False)
    want = eager.predict(eager.embed(img), box=(10, 12, 40, 44), multimask_output=False)
    assert rel(got.low_res_logits, want.low_res_logits) < 1e-4

    from samliverseg.modeling.adapters import apply_adapters

    adapted = apply_adapters(copy.deepcopy(base))
    adapted.spec = base.spec
    notes = []
    b = SlicePredictor(adapted, "cpu", backend="onnxruntime", notify=notes.append).backend
    assert b.name == "torch" and len(notes) == 1 and "adapters" in notes[0] and "using torch" in notes[0]


# -- a missing package (a real failed import), and the command line --------------------------------

@pytest.fixture(scope="module")
def case(tmp_path_factory, phantom):
    d = tmp_path_factory.mktemp("cli")
    ct = d / "ct.nii.gz"
    sitk.WriteImage(phantom.to_sitk("hu"), str(ct))
    k = middle_slice(phantom.liver_mask)
    x0, y0, x1, y1 = bbox_2d(phantom.liver_mask[k])
    return {"dir": d, "ct": ct, "box": [x0 - 2, y0 - 2, x1 + 2, y1 + 2, k]}


def run_segment(case, out, *extra, block=()):
    """``samliverseg segment`` in a subprocess; ``block``: packages whose import fails there."""
    code = ("import sys\n"
            + "".join(f"sys.modules[{b!r}] = None\n" for b in block)
            + "from samliverseg.cli.commands import main\nsys.exit(main(sys.argv[1:]))\n")
    args = ["segment", case["ct"], "-o", out, "--box-ijk", *case["box"], "--no-propagate", "--device", "cpu", *extra]
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return proc.returncode, proc.stdout, proc.stderr


def test_missing_packages_fall_back_to_torch_with_one_line(case):
    d = case["dir"]
    rc, out, err = run_segment(case, d / "a.nii.gz", "--report", d / "a.json", block=("onnxruntime", "openvino"))
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no fast CPU backend is installed" in lines[0] and "using torch" in lines[0], err
    report = json.loads((d / "a.json").read_text())
    assert report["backend"] == "torch" and report["precision"] == "fp32"
    assert report["backend_info"]["notes"] == [lines[0].split("samliverseg: ", 1)[1]]

    rc, out, err = run_segment(case, d / "b.nii.gz", "--backend", "onnxruntime", block=("onnxruntime",))
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "onnxruntime is not installed" in lines[0] and lines[0].endswith("using torch"), err


@pytest.mark.skipif("onnxruntime" not in FAST, reason="onnxruntime (with onnx) is not installed")
def test_cli_backend_and_report(case):
    d = case["dir"]
    rc, out, err = run_segment(case, d / "c.nii.gz", "--backend", "onnxruntime", "--report", d / "c.json")
    assert rc == 0, err
    report = json.loads((d / "c.json").read_text())
    assert report["backend"] == "onnxruntime" and report["precision"] == "fp32"
    info = report["backend_info"]
    assert info["decoder"] == "onnxruntime" and info["version"] and info["startup_s"] >= 0
    t = report["timings"]
    assert t["slices_embedded"] == 1 and len(t["embed_ms"]) == 1 and t["embed_ms"][0] > 0
    assert len(t["decode_ms"]) == t["decodes"] >= 1
    rc, out, err = run_segment(case, d / "t.nii.gz", "--backend", "torch", "--report", d / "t.json")
    assert rc == 0 and err.strip() == "", err
    assert json.loads((d / "t.json").read_text())["backend"] == "torch"
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "c.nii.gz"))) > 0
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "t.nii.gz"))) > 0
    assert b.sum() > 100 and dice(a, b) >= 0.99


def test_unknown_backend_is_a_usage_error(case):
    rc, out, err = run_segment(case, case["dir"] / "x.nii.gz", "--backend", "tensorrt")
    assert rc == 2 and "invalid choice" in err
    rc, out, err = run_segment(case, case["dir"] / "x.nii.gz", "--decoder-precision", "fp16")
    assert rc == 2 and "invalid choice" in err and not (case["dir"] / "x.nii.gz").exists()


def test_cli_decoder_precision_is_reported_and_refused_by_3d_models(case):
    d = case["dir"]
    rc, out, err = run_segment(case, d / "dp.nii.gz", "--backend", "torch", "--decoder-precision", "bf16",
                               "--report", d / "dp.json")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "the mask decoder runs fp32 on torch" in lines[0], err
    info = json.loads((d / "dp.json").read_text())["backend_info"]
    assert info["decoder_precision"] == "fp32" and info["notes"] == [lines[0].split("samliverseg: ", 1)[1]]
    from samliverseg.api import open_model

    with pytest.raises(InputError, match="--decoder-precision bf16 is not supported by sam_med3d_turbo"):
        open_model("sam_med3d_turbo", device="cpu", decoder_precision="bf16")  # before any weights are looked for


# -- the eager torch fixes in TinyViT ---------------------------------------------------------------

def test_folded_batchnorm_follows_the_weights_and_keeps_gradients():
    model, other = tiny_litemedsam(7), tiny_litemedsam(8)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model.image_encoder(x)
        model.load_state_dict(other.state_dict())  # in place: the folded weights must follow
        assert torch.allclose(model.image_encoder(x), other.image_encoder(x), atol=1e-6)
        assert not torch.allclose(model.image_encoder(x), before, atol=1e-3)
    conv_bn = model.image_encoder.patch_embed.seq[0]
    unfolded = conv_bn.bn(conv_bn.c(x))  # eval mode: running statistics, as the fold
    assert torch.allclose(conv_bn(x), unfolded, atol=1e-5)
    conv_bn(x).sum().backward()  # eval mode with gradients (adapter training): they reach the weights
    assert conv_bn.c.weight.grad is not None and conv_bn.bn.weight.grad is not None


def test_attention_bias_as_4d_matches_the_plain_formula():
    attn = tiny_litemedsam(9).image_encoder.layers[1].blocks[0].attn
    with torch.no_grad():
        attn.attention_biases.normal_()
        x = torch.randn(3, 49, attn.norm.normalized_shape[0])
        b, n, _ = x.shape
        q, k, v = attn.qkv(attn.norm(x)).view(b, n, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], 3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) * attn.scale + attn.attention_biases[:, attn.attention_bias_idxs]
        want = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, attn.dh))
        assert torch.allclose(attn(x), want, atol=1e-5)
