"""Med-SA adapters (modeling/adapters.py) and the adapter trainer (training/adapter_trainer.py).

Real modules only: tiny random-weight SAM ViT / TinyViT configurations, full-size ViT-B on the
meta device for parameter counts, the real LiteMedSAM for one forward/backward pass, a cache of
phantom cases for the trainer (single process, resumed, and two gloo ranks).
"""

import copy
import json
import os
import socket
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from libtest_helpers import (SCRIPTS, build_tiny_sam, make_phantom_cache, phantom_caches_in_two_orders,
                             save_tiny_sam, tiny_sam_fixture, tiny_sam_json, writer)
from samliverseg.models.build_sam import build_lite_medsam, build_model, build_sam_vit_b, find_model_checkpoint
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.modeling import MaskDecoder, PromptEncoder, SamModel, TinyViT, TwoWayTransformer
from samliverseg.modeling.adapters import (AdaptedTwoWayTransformer, AdapterConfig, adapter_state, apply_adapters,
                                           count_parameters, embed_slab, is_adapter_key)
from samliverseg.models.adapters import load_adapted_model, save_adapted_model
from samliverseg.demo.phantom import make_phantom
from samliverseg.interactive.engine import PromptEngine
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.core.prompts import Prompts, SliceBox
from samliverseg.training import checkpoint as ck
from samliverseg.training.adapter import AdapterTrainer
from samliverseg.training.config import config_from_dict, load_config
from samliverseg.training.progress import read_events
from samliverseg.training.train import main as train_main
from samliverseg.core.windowing import get_window

TINY = "tiny_adapter_sam"
ROOT = Path(__file__).resolve().parents[1]
HAS_LITE = find_model_checkpoint("lite_medsam") is not None

ARCH = {"window_size": 2}  # the tiny SAM's windows here: 2x2 tokens


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One torch thread: on a shared 2-core machine, spinning worker threads make the tiny
    models' tiny matmuls 50x slower."""
    yield


def tiny_vit_sam(image_size=128):
    """A small SAM ViT: 8x8 token grid, block 0 windowed (window 4), block 1 global."""
    return build_tiny_sam(image_size=image_size)


def tiny_tinyvit_sam():
    """A small TinyViT SAM (64 px in, 16x16 embedding), windowed attention in stages 2-4."""
    enc = TinyViT(img_size=64, embed_dims=(16, 32, 32, 48), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2),
                  window_sizes=(4, 4, 8, 4), out_chans=32)
    model = SamModel(enc, PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(64, 64),
                                        mask_in_chans=4),
                     MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                                                                                   num_heads=2),
                                 iou_head_hidden_dim=32))
    return model.eval()


def randomise_adapters(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_key(name):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def run(model, x, boxes):
    with torch.no_grad():
        return model(x, boxes=boxes, multimask_output=False)[0]


BOXES = torch.tensor([[10.0, 12.0, 80.0, 90.0]])


# ------------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("builder", [tiny_vit_sam, tiny_tinyvit_sam], ids=["vit", "tinyvit"])
@pytest.mark.parametrize("sd_trans", [False, True])
def test_zero_init_equals_base_and_base_keys_load_strictly(builder, sd_trans):
    torch.manual_seed(0)
    base = builder()
    s = base.image_size
    x = torch.randn(6, 3, s, s)
    boxes = (BOXES * s / 128).expand(6, 4)
    ref = run(base, x, boxes)
    adapted = apply_adapters(copy.deepcopy(base), dict(sd_trans=sd_trans, depth=3))
    assert torch.equal(run(adapted, x, boxes), ref)
    # the base keys are unchanged and load strictly into the base part
    base_sd = base.state_dict()
    res = adapted.load_state_dict(base_sd, strict=False)
    assert res.unexpected_keys == [] and res.missing_keys and all(is_adapter_key(k) for k in res.missing_keys)
    extra = set(adapted.state_dict()) - set(base_sd)
    assert extra == set(res.missing_keys) and all(".adapter_" in k for k in extra)
    assert any("adapter_hyp_in" in k for k in extra) and any("adapter_mlp" in k for k in extra)
    assert any("adapter_depth" in k for k in extra) == sd_trans
    # the adapters are what changes the output (so the equality above can fail)
    randomise_adapters(adapted)
    assert not torch.allclose(run(adapted, x, boxes), ref, atol=1e-4)


def test_no_gradient_reaches_frozen_parameters():
    torch.manual_seed(0)
    model = apply_adapters(tiny_vit_sam(), dict(sd_trans=True, depth=2))
    randomise_adapters(model)
    low, _ = model(torch.randn(4, 3, 128, 128), boxes=BOXES.expand(4, 4))
    low.square().mean().backward()
    named = dict(model.named_parameters())
    assert all(p.grad is None for n, p in named.items() if not is_adapter_key(n))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if is_adapter_key(n))
    assert not any(p.requires_grad for n, p in named.items() if not is_adapter_key(n))


# ------------------------------------------------------------------------------- parameter counts
def test_trainable_fraction_about_two_percent():
    with torch.device("meta"):
        vit_b = apply_adapters(build_sam_vit_b())
    lite = apply_adapters(build_lite_medsam())
    cv, cl = count_parameters(vit_b), count_parameters(lite)
    print(f"ViT-B: encoder {cv['encoder_base']}, encoder adapters {cv['encoder_adapters']} "
          f"({100 * cv['encoder_fraction']:.2f} %), HyP {cv['decoder_adapters']}")
    print(f"TinyViT: encoder {cl['encoder_base']}, encoder adapters {cl['encoder_adapters']} "
          f"({100 * cl['encoder_fraction']:.2f} %), HyP {cl['decoder_adapters']}")
    assert cv["encoder_base"] == 89_670_912  # SAM ViT-B's image encoder
    assert 0.015 < cv["encoder_fraction"] < 0.025 and 0.015 < cl["encoder_fraction"] < 0.025
    # 12 blocks x 2 adapters x (768*48 + 48 + 48*768 + 768)
    assert cv["encoder_adapters"] == 24 * (2 * 768 * 48 + 48 + 768)
    # the width option really sets the width
    with torch.device("meta"):
        wide = apply_adapters(build_sam_vit_b(), dict(bottleneck=96, mlp_adapter=False, hyp=False))
    assert count_parameters(wide)["encoder_adapters"] == 12 * (2 * 768 * 96 + 96 + 768)


# ------------------------------------------------------------------------------- SD-Trans
@pytest.mark.parametrize("builder", [tiny_vit_sam, tiny_tinyvit_sam], ids=["vit", "tinyvit"])
def test_sd_trans_mixes_slices_of_a_slab_only_through_the_adapter(builder):
    torch.manual_seed(0)
    base = builder()
    s = base.image_size
    x = torch.randn(6, 3, s, s)  # two slabs of 3
    plain = apply_adapters(copy.deepcopy(base), dict(sd_trans=False, hyp=False))
    slab = apply_adapters(copy.deepcopy(base), dict(sd_trans=True, depth=3, hyp=False))
    with torch.no_grad():
        assert torch.equal(slab.image_encoder(x), base.image_encoder(x))  # zero-init: same as 2D
        randomise_adapters(slab, scale=0.2)
        # the same space/MLP adapters without the depth branch
        plain.load_state_dict({k: v for k, v in slab.state_dict().items() if "adapter_depth" not in k})
        e_slab, e_plain = slab.image_encoder(x), plain.image_encoder(x)
        assert not torch.allclose(e_slab, e_plain, atol=1e-5)  # the depth adapter acts
        # inter-slice context: changing slice 0 changes slices 1-2 of its slab, not the other slab
        x2 = x.clone()
        x2[0] += 1.0
        d_slab = (slab.image_encoder(x2) - e_slab).flatten(1).abs().amax(1)
        d_plain = (plain.image_encoder(x2) - e_plain).flatten(1).abs().amax(1)
        assert d_slab[1] > 1e-6 and d_slab[2] > 1e-6 and torch.all(d_slab[3:] == 0)
        assert torch.all(d_plain[1:] == 0)  # 2D adapters keep slices independent
        # slab rule: 4 images are not slabs of 3; 2 images are one partial slab; embed_slab uses the batch
        with pytest.raises(ValueError, match="slabs of 3"):
            slab.image_encoder(x[:4])
        assert slab.image_encoder(x[:2]).shape[0] == 2
        whole = embed_slab(slab, x)
        assert whole.shape[0] == 6 and not torch.allclose(whole, e_slab, atol=1e-5)
        assert torch.equal(slab.image_encoder(x), e_slab)  # embed_slab restored D


# ------------------------------------------------------------------------------- HyP-Adpt
def test_hyp_adapter_shape_and_prompt_dependence():
    torch.manual_seed(0)
    base = tiny_vit_sam()
    model = apply_adapters(copy.deepcopy(base), dict(hyp=True, mlp_adapter=False))
    tr = model.mask_decoder.transformer
    assert isinstance(tr, AdaptedTwoWayTransformer) and tr.n_output_tokens == 5
    randomise_adapters(model, scale=0.2)
    x = torch.randn(1, 3, 128, 128)
    emb = model.image_encoder(x).detach()
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [40.0, 30.0, 120.0, 110.0]])
    with torch.no_grad():
        low, iou = model.decode(emb, boxes=boxes, multimask_output=True)
        assert low.shape == (2, 3, 32, 32) and iou.shape == (2, 3)
        low1, _ = model.decode(emb, boxes=boxes, multimask_output=False)
        assert low1.shape == (2, 1, 32, 32)
        # the HyP adapter's output for the same image tokens depends on the prompt
        sparse, _ = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        p = sparse.mean(1)
        tokens = emb.flatten(2).transpose(1, 2).expand(2, -1, -1)
        delta = tr.adapter_hyp_in(tokens, p)
        assert delta.shape == tokens.shape and not torch.allclose(delta[0], delta[1], atol=1e-6)
        w, beta = tr.adapter_hyp_in.prompt_weights(p)
        assert w.shape == (2, 8, 8) and beta.shape == (2, 8)
        # prompt vector = mean of the sparse tokens after the 5 output tokens
        pts = torch.cat([torch.randn(2, 5, 32), sparse], dim=1)
        assert torch.allclose(tr.prompt_vector(pts), p)
        # decoder output differs from the base decoder's only through HyP (the encoder has no MLP
        # adapter here, but space adapters: use the base decoder on the adapted embedding)
        base_low, _ = base.decode(emb, boxes=boxes, multimask_output=False)
        assert not torch.allclose(low1, base_low, atol=1e-4)


# ------------------------------------------------------------------------------- real LiteMedSAM
@pytest.mark.skipif(not HAS_LITE, reason="LiteMedSAM weights not installed")
def test_lite_medsam_zero_init_and_frozen_gradients():
    base = build_model("lite_medsam")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    boxes = torch.tensor([[60.0, 70.0, 190.0, 200.0]])
    ref = run(base, x, boxes)
    bn_before = {k: v.clone() for k, v in base.state_dict().items() if "running_" in k}
    model = apply_adapters(base, {})
    low, _ = model(x, boxes=boxes, multimask_output=False)
    assert torch.equal(low.detach(), ref)
    low.sigmoid().mean().backward()
    named = dict(model.named_parameters())
    assert all(p.grad is None for n, p in named.items() if not is_adapter_key(n))
    ups = [n for n in named if is_adapter_key(n) and ".up." in n]
    assert ups and all(named[n].grad is not None for n in ups)
    assert sum(1 for n in named if n.endswith("adapter_space.down.weight")) == 10  # LiteMedSAM's attention blocks
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in bn_before.items())  # BatchNorm statistics untouched


# ------------------------------------------------------------------------------- save / load
tiny_model = tiny_sam_fixture(TINY, arch=ARCH)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("adata")
    m = make_phantom_cache(root, 3, (12, 64, 64), (3.0, 3.0, 5.0), val_fraction=0.34, seed=0)
    assert m["summary"]["train"] >= 1 and m["summary"]["val"] >= 1
    weights = save_tiny_sam(root / f"{TINY}.pth", seed=123, **ARCH)
    return {"cache": root / "cache", "weights": weights, "root": root}


def test_save_load_round_trip_and_predictor(cache, tmp_path):
    model = build_model(TINY, checkpoint=cache["weights"])
    torch.manual_seed(5)
    apply_adapters(model, dict(sd_trans=True, depth=2))
    randomise_adapters(model, scale=0.2)
    path = save_adapted_model(model, tmp_path / "model.pth", base_model=TINY, base_checkpoint=cache["weights"],
                              metadata={"window": "liver", "target": "liver"})
    obj = torch.load(path, weights_only=True)
    assert set(obj["model"]) == set(adapter_state(model)) and all(is_adapter_key(k) for k in obj["model"])
    meta = obj["metadata"]
    assert meta["kind"] == "adapter" and meta["base_model"] == TINY and len(meta["base_checkpoint_sha256"]) == 64
    assert meta["adapter"]["sd_trans"] is True and meta["adapter"]["depth"] == 2
    loaded = load_adapted_model(path)
    assert loaded.spec.window == "liver" and loaded.adapter_metadata["kind"] == "adapter"
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0]] * 2)
    model.requires_grad_(False)  # as loaded (requires_grad alone changes the last float bit of a kernel)
    assert torch.equal(run(loaded, x, boxes), run(model, x, boxes))
    # the adapted model works in the slice predictor like a SamModel
    img = (np.random.default_rng(0).random((80, 70)) * 255).astype(np.uint8)
    outs = []
    for m in (model, loaded):
        pred = SlicePredictor(m, torch.device("cpu"))
        outs.append(pred.predict(pred.embed(img, (1.0, 1.0)), box=(10, 12, 50, 60), multimask_output=False).masks)
    assert outs[0].shape == (1, 80, 70) and np.array_equal(outs[0], outs[1])
    # and in the prompt engine, whose default window is the one the adapters were trained with
    engine = PromptEngine(loaded, device="cpu")
    assert engine.window.spec() == get_window("liver").spec()
    engine.set_volume(make_phantom((8, 48, 40), (3.0, 3.0, 5.0), seed=0, n_tumors=0).to_volume())
    res = engine.segment_slice(Prompts(box=SliceBox.axial(8, 10, 30, 36, 3)))
    assert res.mask.shape == (48, 40) and res.mask.dtype == bool


def test_cli_train_kind_adapter(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMLIVERSEG_MODELS", str(tmp_path / "models"))  # train registers the model there
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps(dict(cache=str(cache["cache"]), output=str(tmp_path / "run"), kind="adapter",
                                   base_model=TINY, checkpoint=str(cache["weights"]), epochs=1, batch_size=2,
                                   max_slices_per_case=1, device="cpu", adapter={"hyp": False})))
    assert train_main(["--config", str(cfg)]) == 0
    model = load_adapted_model(tmp_path / "run" / "model.pth")
    assert not isinstance(model.mask_decoder.transformer, AdaptedTwoWayTransformer)
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()
    assert (tmp_path / "models" / "run").is_dir()  # registered by name in the folder given above


def test_load_errors(cache, tmp_path):
    model = apply_adapters(build_model(TINY, checkpoint=cache["weights"]), {})
    good = save_adapted_model(model, tmp_path / "a.pth", base_model=TINY, base_checkpoint=cache["weights"])
    obj = torch.load(good, weights_only=True)
    # another kind
    other = dict(obj, metadata=dict(obj["metadata"], kind="unet"))
    torch.save(other, tmp_path / "unet.pth")
    with pytest.raises(CheckpointError, match="kind 'unet'.*expected.*'adapter'"):
        load_adapted_model(tmp_path / "unet.pth")
    # an extra / missing key
    bad = dict(obj, model=dict(obj["model"], **{"image_encoder.blocks.0.adapter_x.weight": torch.zeros(1)}))
    torch.save(bad, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_adapted_model(tmp_path / "extra.pth")
    miss = dict(obj, model={k: v for i, (k, v) in enumerate(obj["model"].items()) if i})
    torch.save(miss, tmp_path / "miss.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_adapted_model(tmp_path / "miss.pth")
    # other base weights than those the adapters were trained on
    changed = tmp_path / "changed.pth"
    sd = torch.load(cache["weights"], weights_only=True)
    sd["mask_decoder.iou_token.weight"] = sd["mask_decoder.iou_token.weight"] + 1
    torch.save(sd, changed)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_adapted_model(good, base_checkpoint=changed)
    assert load_adapted_model(good, base_checkpoint=cache["weights"]) is not None
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_adapted_model(tmp_path / "junk.pth")


# ------------------------------------------------------------------------------- trainer
def tiny_cfg(cache, out, adapter=None, **kw):
    d = dict(cache=str(cache["cache"]), output=str(out), kind="adapter", base_model=TINY,
             checkpoint=str(cache["weights"]), epochs=2, batch_size=2, lr=3e-3, box_jitter_px=3,
             max_slices_per_case=3, seed=7, device="cpu", scheduler="cosine", adapter=adapter or {})
    d.update(kw)
    return config_from_dict(d)


def test_the_trainer_shows_the_model_each_slice_as_the_engine_does(tiny_model, tmp_path):
    """The adapter trainer's slabs and targets of one phantom stored LPS and stored RAS are the same:
    each slice turned upright as the engine turns it (``slice_view``)."""
    weights = save_tiny_sam(tmp_path / "tiny.pth", seed=5, **ARCH)
    caches, _ = phantom_caches_in_two_orders(tmp_path)
    sets = {order: AdapterTrainer(tiny_cfg({"cache": cache, "weights": weights}, tmp_path / order / "run",
                                           {"sd_trans": True, "depth": 3}), progress=writer()[0])
            ._build_set("train", lambda: False) for order, (cache, _) in caches.items()}
    lps, ras = sets["lps"], sets["ras"]
    assert lps.ids == ras.ids and len(lps.ids) >= 1 and lps.masks.sum() > 0
    assert all(np.array_equal(a, b) for a, b in zip(lps.images, ras.images))
    assert torch.equal(lps.masks, ras.masks) and torch.equal(lps.low_res, ras.low_res)
    assert lps.pixel_spacing == ras.pixel_spacing


def test_options_validation(cache, tmp_path):
    with pytest.raises(InputError, match="adapter.depth"):
        tiny_cfg(cache, tmp_path, adapter={"depth": 0})
    with pytest.raises(InputError, match="adapter.bogus"):
        tiny_cfg(cache, tmp_path, adapter={"bogus": 1})
    with pytest.raises(InputError, match="adapter.sd_trans"):
        tiny_cfg(cache, tmp_path, adapter={"sd_trans": "yes"})
    with pytest.raises(InputError, match="bogus"):
        AdapterConfig.from_any({"bogus": 1})
    with pytest.raises(InputError, match="hyp_rank"):
        apply_adapters(tiny_vit_sam(), {"hyp_rank": 0})
    opts = tiny_cfg(cache, tmp_path, adapter={"train_decoder": True, "bottleneck": 4}).options()
    assert opts.train_decoder and opts.adapter_config().width(768) == 4


@pytest.mark.parametrize("adapter,stop_at", [({}, 2), ({"sd_trans": True, "depth": 3, "train_decoder": True}, 3)],
                         ids=["2d", "sdtrans_decoder"])
def test_train_resume_equals_uninterrupted(cache, tmp_path, adapter, stop_at):
    pw, out = writer()
    straight = AdapterTrainer(tiny_cfg(cache, tmp_path / "a", adapter), progress=pw)
    res = straight.run()
    assert res["status"] == "done" and res["step"] == 6  # 6 train samples / batch 2 = 3 steps x 2 epochs
    ev = out.events()
    names = [e["event"] for e in ev]
    assert names[0] == "start" and names[-1] == "done" and names.count("step") == 6
    assert ev[0]["kind"] == "adapter" and names.count("validation") == 2

    pw1, out1 = writer()
    first = AdapterTrainer(tiny_cfg(cache, tmp_path / "b", adapter), progress=pw1)
    with pytest.raises(CancelledError):
        first.run(cancel=lambda: first.step >= stop_at)
    assert out1.events()[-1]["event"] == "cancelled" and out1.events()[-1]["step"] == stop_at
    pw2, out2 = writer()
    res2 = AdapterTrainer(tiny_cfg(cache, tmp_path / "b", adapter), progress=pw2).run(resume=True)
    assert res2["step"] == 6 and out2.events()[0]["resumed"] is True

    a = ck.load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = ck.load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    decoder_keys = [k for k in a if not is_adapter_key(k)]
    if adapter.get("train_decoder"):
        assert decoder_keys and all(k.startswith("mask_decoder.") for k in decoder_keys)
        assert any("adapter_depth" in k for k in a)
    else:
        assert decoder_keys == []
    # training changed the adapters (so the comparison above can fail)
    assert any(".up." in k and a[k].abs().sum() > 0 for k in a)
    # model.pth: only adapter (+ decoder) keys and the base reference; it loads and runs
    obj = torch.load(tmp_path / "a" / "model.pth", weights_only=True)
    meta = obj["metadata"]
    assert set(obj["model"]) == set(a) and meta["kind"] == "adapter" and meta["base_model"] == TINY
    assert meta["window"] == "abdomen" and meta["label_meaning"].startswith("label > 0")
    assert meta["base_checkpoint_sha256"] and Path(meta["base_checkpoint"]).name == f"{TINY}.pth"
    loaded = load_adapted_model(tmp_path / "a" / "model.pth")
    best = ck.load_checkpoint(tmp_path / "a" / "best.pt")["model"]
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best.items())


def test_resume_from_another_kind_is_refused(cache, tmp_path):
    from samliverseg.training.decoder import DecoderTrainer

    dec = config_from_dict(dict(cache=str(cache["cache"]), output=str(tmp_path / "r"), base_model=TINY,
                                checkpoint=str(cache["weights"]), epochs=1, batch_size=2, max_slices_per_case=1,
                                device="cpu"))
    DecoderTrainer(dec, progress=writer()[0]).run()
    with pytest.raises(CheckpointError, match="expected kind 'adapter'"):
        AdapterTrainer(tiny_cfg(cache, tmp_path / "r", epochs=1, max_slices_per_case=1), progress=writer()[0]).run(resume=True)
    with pytest.raises(CheckpointError, match="kind 'decoder'.*'adapter'"):
        load_adapted_model(tmp_path / "r" / "model.pth")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_average_gradients_like_one_process(cache, tmp_path):
    """Two gloo ranks, each running its share of every micro-batch (with the prompts drawn for the
    whole batch), get the single-process gradient after the all-reduce, stay in sync through a
    run (batch_size 2 per process: one step of 4), and only rank 0 reports."""
    cfg = tmp_path / "ddp.json"
    cfg.write_text(json.dumps(dict(cache=str(cache["cache"]), output=str(tmp_path / "ddp"), kind="adapter",
                                   base_model=TINY, checkpoint=str(cache["weights"]), batch_size=2, lr=3e-3,
                                   box_jitter_px=3, points_per_slice=1, seed=7, device="cpu", epochs=1,
                                   max_slices_per_case=2,
                                   adapter={"train_decoder": True})))
    script = SCRIPTS / "adapter_ddp_step.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    spec = tiny_sam_json(TINY, ARCH)
    procs = [subprocess.Popen([sys.executable, str(script), str(cfg), str(tmp_path), spec],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    ev = read_events(outs[0][0])
    assert ev[0]["event"] == "start" and ev[0]["world_size"] == 2 and ev[-1]["event"] == "done"
    assert ev[-1]["step"] == 1 and ev[0]["train_slices"] == 4  # one global batch of 2 x 2
    assert outs[1][0] == ""  # rank 1 is silent
    # the same step in this (single) process
    single = runpy.run_path(str(script))["grads_of_one_step"](load_config(cfg), 0)
    for r in range(2):
        ddp = torch.load(tmp_path / f"grads{r}.pt", weights_only=True)
        assert ddp.keys() == single.keys()
        for k in single:
            assert torch.allclose(ddp[k], single[k], rtol=1e-4, atol=1e-7), k
    assert any(k.startswith("mask_decoder.") for k in single) and any(".down." in k for k in single)
    f0, f1 = (torch.load(tmp_path / f"final{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.allclose(f0[k], f1[k], rtol=0, atol=1e-7) for k in f0)  # the ranks stayed in sync
