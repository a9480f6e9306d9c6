"""SAM-Med3D: checkpoint compatibility (keys and shapes of the published files, strict and safe
loading, clear errors), the 3D modules' maths, the engine's geometry (exact, without a model) and
the engine / CLI end to end with the small configuration (random or constructed weights: no
published weights are available offline)."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from libtest_helpers import build_tiny_sam, random_tiny_sam3d, rot
from samliverseg.models.build_sam3d import (MODEL3D_REGISTRY, build_model3d, build_sam_med3d_tiny, build_sam_med3d_vit_b,
                                     count_parameters, get_spec3d, is_model3d, load_state3d)
from samliverseg.core.geometry import resample
from samliverseg.interactive.engine3d import (PatchBox, Sam3DEngine, Sam3DSettings, blend_patches, crop_patch, cube_index_to_grid_kji,
                                  cube_to_patch, gaussian_weight, grid_to_input_mask, input_ijk_to_grid_ijk,
                                  keep_clicked_components, layout_for, patch_around, patch_point_to_cube, patch_to_cube,
                                  sliding_candidates, validate_clicks, zscore_patch)
from samliverseg.core.errors import CheckpointError, InputError, PromptError, WeightsMissingError
from samliverseg.modeling3d.image_encoder3d import Attention3D, Block3D, window_partition3d, window_unpartition3d
from samliverseg.demo.phantom import make_phantom
from samliverseg.io.volume import Volume

FIXTURE = Path(__file__).parent / "fixtures" / "sam_med3d_keys.json"


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    """No cached weights and no checkpoint variables: lookups see only what a test gives."""
    monkeypatch.setenv("SAMLIVERSEG_CACHE", str(tmp_path / "cache"))
    for name in MODEL3D_REGISTRY:
        monkeypatch.delenv(get_spec3d(name).env_var, raising=False)


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_sam3d()


def _constant_model(logit: float):
    """A real tiny SAM-Med3D whose decoder predicts ``logit`` everywhere (final upscaling conv
    zeroed with bias 1, hypernetwork output = constant): a deterministic model for the sliding logic."""
    torch.manual_seed(1)
    m = build_sam_med3d_tiny()
    up = m.mask_decoder.output_upscaling[3]
    c8 = up.out_channels
    gelu1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    with torch.no_grad():
        up.weight.zero_()
        up.bias.fill_(1.0)
        for mlp in m.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(logit / (gelu1 * c8))
    return m


# ============================================================================ checkpoints

def test_full_size_state_dict_matches_the_published_keys_and_shapes():
    expected = json.loads(FIXTURE.read_text())
    with torch.device("meta"):
        model = build_sam_med3d_vit_b()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected["keys"])) == [] and sorted(set(expected["keys"]) - set(got)) == []
    assert {k: v for k, v in got.items() if v != expected["keys"][k]} == {}
    assert count_parameters(model) == expected["num_parameters"]
    assert 100e6 < expected["num_parameters"] < 101e6  # SAM-Med3D is a ~100 M parameter ViT-B


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_published_format_and_bare_state_dicts_load_strictly_with_weights_only(tiny, tmp_path):
    sd = tiny.state_dict()
    published = {"epoch": 12, "model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
                 "losses": [0.9, 0.5], "best_dice": 0.8, "used_datas": ["ct_liver"],
                 "args": argparse.Namespace(model_type="vit_b_ori", lr=8e-4, step_size=[120, 180])}
    for name, obj in [("published.pth", published), ("bare.pth", sd),
                      ("ddp.pth", {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}})]:
        path = _save(obj, tmp_path / name)
        model = build_model3d("sam_med3d_tiny", checkpoint=path, device="cpu")
        assert model.spec.name == "sam_med3d_tiny" and not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)


def test_other_architectures_and_bad_files_give_checkpoint_errors_naming_the_expected_one(tiny, tmp_path):
    sam2d = build_tiny_sam(decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_hidden_dim=256)  # SAM's decoder sizes
    with pytest.raises(CheckpointError) as e:
        build_model3d("sam_med3d", checkpoint=_save(sam2d.state_dict(), tmp_path / "sam2d.pth"))
    msg = str(e.value)
    assert "SAM-Med3D ViT-B" in msg and "a SAM ViT" in msg and "\n" not in msg
    with pytest.raises(CheckpointError) as e:  # another 3D size
        build_model3d("sam_med3d_turbo", checkpoint=_save({"model_state_dict": tiny.state_dict()}, tmp_path / "t.pth"))
    assert "SAM-Med3D ViT-B" in str(e.value) and "SAM-Med3D-style checkpoint (32 dims, 2 blocks, 64^3 input" in str(e.value)
    good = _save(tiny.state_dict(), tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build_model3d("sam_med3d_tiny", checkpoint=truncated)
    with pytest.raises(CheckpointError, match="pickled Python objects"):  # arbitrary classes are refused
        load_state3d(_save({"model_state_dict": tiny.state_dict(), "extra": Path("x")}, tmp_path / "obj.pth"))
    with pytest.raises(CheckpointError, match="holds no model state dict"):
        load_state3d(_save({"epoch": 1}, tmp_path / "empty.pth"))


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(WeightsMissingError) as e:
        build_model3d("sam_med3d_turbo")
    msg = str(e.value)
    for words in ("sam_med3d_turbo.pth", "huggingface.co/blueyo0/SAM-Med3D", "SAMLIVERSEG_SAM_MED3D_TURBO_CHECKPOINT",
                  "--checkpoint", str(tmp_path / "cache")):
        assert words in msg, (words, msg)
    with pytest.raises(WeightsMissingError, match="does not exist"):
        build_model3d("sam_med3d", checkpoint=tmp_path / "nope.pth")
    assert is_model3d("sam_med3d") and is_model3d("sam_med3d_turbo") and not is_model3d("lite_medsam")


# ============================================================================ modules

def test_attention_with_decomposed_3d_relative_positions_matches_a_direct_computation():
    torch.manual_seed(0)
    dim, heads, size = 8, 2, (2, 3, 4)
    att = Attention3D(dim, heads, use_rel_pos=True, input_size=size)
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, *size, dim)
    out = att(x)
    hd = dim // heads
    qkv = x.reshape(-1, dim) @ att.qkv.weight.t() + att.qkv.bias
    q, k, v = qkv[:, :dim], qkv[:, dim:2 * dim], qkv[:, 2 * dim:]
    pos = [(a, b, c) for a in range(size[0]) for b in range(size[1]) for c in range(size[2])]
    ref = torch.zeros(len(pos), dim)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        for i, (a, b, c) in enumerate(pos):
            logits = torch.stack([
                q[i, s] @ k[j, s] / math.sqrt(hd) + q[i, s] @ att.rel_pos_d[a - a2 + size[0] - 1]
                + q[i, s] @ att.rel_pos_h[b - b2 + size[1] - 1] + q[i, s] @ att.rel_pos_w[c - c2 + size[2] - 1]
                for j, (a2, b2, c2) in enumerate(pos)])
            ref[i, s] = torch.softmax(logits, 0) @ v[:, s]
    ref = (ref @ att.proj.weight.t() + att.proj.bias).reshape(out.shape)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(att(x, queries=(1, 2, 3)), out[:, :1, :2, :3], atol=1e-6)


def test_padded_single_window_fast_path_equals_window_partition():
    torch.manual_seed(0)
    blk = Block3D(16, 2, use_rel_pos=True, window_size=6, input_size=(4, 4, 4))
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 4, 4, 4, 16)
    assert torch.allclose(blk(x, fast_single_window=True), blk(x, fast_single_window=False), atol=1e-5)
    y = torch.randn(1, 5, 7, 3, 4)
    windows, padded = window_partition3d(y, 3)
    assert windows.shape == (2 * 3 * 1, 3, 3, 3, 4) and padded == (6, 9, 3)
    assert torch.equal(window_unpartition3d(windows, 3, padded, (5, 7, 3)), y)


def test_tiny_model_shapes_and_prompt_encoder_conventions(tiny):
    with torch.inference_mode():
        emb = tiny.encode(torch.randn(1, 1, 64, 64, 64))
        assert emb.shape == (1, 48, 4, 4, 4)
        pts = (torch.tensor([[[10.0, 20.0, 30.0], [40.0, 5.0, 60.0]]]), torch.tensor([[1, 0]]))
        low, iou = tiny.decode(emb, pts, torch.zeros(1, 1, 16, 16, 16))
        assert low.shape == (1, 1, 16, 16, 16) and iou.shape == (1, 1)
        low3, iou3 = tiny.decode(emb, pts, None, multimask_output=True)
        assert low3.shape == (1, 3, 16, 16, 16) and iou3.shape == (1, 3)
        with pytest.raises(ValueError):
            tiny.encode(torch.randn(1, 1, 32, 32, 32))
        pe = tiny.prompt_encoder
        sparse, dense = pe(points=pts)
        assert sparse.shape == (1, 3, 48) and dense.shape == (1, 48, 4, 4, 4)  # + the padding point
        assert torch.equal(sparse[0, 2], pe.not_a_point_embed.weight[0])
        raw = pe.pe_layer.forward_with_coords(pts[0] + 0.5, (64, 64, 64))
        assert torch.allclose(sparse[0, 0] - raw[0, 0], pe.point_embeddings[1].weight[0])
        assert torch.allclose(sparse[0, 1] - raw[0, 1], pe.point_embeddings[0].weight[0])
        # the published convention: a point at cube voxel x is encoded like the dense token whose
        # first two grid indices are swapped: token (a, b, c) <-> point ((b+.5)S/G-.5, (a+.5)S/G-.5, (c+.5)S/G-.5)
        dense_pe = pe.get_dense_pe()[0]
        a, b, c = 0, 3, 1
        x = torch.tensor([[[(b + 0.5) * 16 - 0.5, (a + 0.5) * 16 - 0.5, (c + 0.5) * 16 - 0.5]]])
        assert torch.allclose(pe.pe_layer.forward_with_coords(x + 0.5, (64, 64, 64))[0, 0], dense_pe[:, a, b, c], atol=1e-5)


# ============================================================================ geometry (no model)

def _oblique_volume(shape_kji=(30, 40, 50), spacing=(0.8, 1.1, 2.5)):
    direction = rot("z", 30) @ rot("x", 15) @ np.diag([1.0, -1.0, 1.0])  # oblique and flipped
    rng = np.random.default_rng(0)
    return Volume(rng.normal(0, 50, shape_kji).astype(np.float32), spacing, (10.0, -20.0, 30.0), direction)


def test_working_grid_keeps_origin_and_direction_and_covers_the_volume():
    vol = _oblique_volume()
    g_in = vol.grid
    work = g_in.resampled((1.5, 1.5, 1.5), extent="cover")
    assert work.origin == g_in.origin and np.allclose(work.direction_matrix, vol.direction)
    assert work.shape_kji == (50, 29, 27)  # floor((n - 1/2) s / 1.5) + 1
    pts = np.array([[0, 0, 0], [49, 39, 29], [12.3, 7.5, 20.2]])
    g = input_ijk_to_grid_ijk(pts, g_in, work)
    assert np.allclose(work.ijk_to_lps(g), vol.ijk_to_lps(pts))
    # resampling a linear ramp of the LPS x coordinate is exact (linear interpolation)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij")
    lps = vol.ijk_to_lps(np.stack([ii, jj, kk], -1).reshape(-1, 3))
    ramp = Volume(lps[:, 0].reshape(vol.array.shape).astype(np.float32), vol.spacing, vol.origin, vol.direction)
    arr = resample(ramp.array, ramp.grid, work).array
    k2, j2, i2 = (np.array(v) for v in ([10, 40], [5, 20], [3, 17]))
    expect = work.ijk_to_lps(np.stack([i2, j2, k2], -1))[:, 0]
    assert np.allclose(arr[k2, j2, i2], expect, atol=1e-3)


def test_layouts():
    assert layout_for(np.eye(3), "ras").describe() == "-i,-j,+k"  # LPS axial CT: i->L, j->P
    assert layout_for(np.diag([-1.0, -1.0, 1.0]), "ras").describe() == "+i,+j,+k"
    assert layout_for(np.eye(3), "kji").describe() == "+k,+j,+i"
    sagittal = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # i->P, j->S (down: -), k->R
    assert layout_for(sagittal, "ras").describe() == "+k,-i,-j"
    lay = layout_for(rot("z", 30) @ rot("x", 15), "ras")
    assert sorted(lay.axes) == [0, 1, 2]
    with pytest.raises(InputError):
        layout_for(np.eye(3), "xyz")


@pytest.mark.parametrize("kind", ["ras", "kji"])
def test_cube_and_point_mappings_are_exact_inverses(kind):
    direction = rot("z", 30) @ rot("x", 15) @ np.diag([1.0, -1.0, 1.0])
    lay = layout_for(direction, kind)
    grid_shape = (40, 30, 50)
    probe = np.arange(np.prod(grid_shape), dtype=np.float64).reshape(grid_shape)  # identity-like probe
    box = PatchBox((-5, 3, 20), 16)  # partly outside the grid (padded)
    cube = patch_to_cube(crop_patch(probe, box, -1.0), lay)
    assert np.array_equal(cube_to_patch(cube, lay), crop_patch(probe, box, -1.0))
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = rng.integers(0, 16, 3)
        g = cube_index_to_grid_kji(t, box, lay)
        assert np.allclose(patch_point_to_cube(g, box, lay), t)
        gi = tuple(int(v) for v in g)
        inside = all(0 <= v < n for v, n in zip(gi, grid_shape))
        assert cube[tuple(t)] == (probe[gi] if inside else -1.0)
    # pasting the cube back puts every value where it came from
    back = blend_patches(grid_shape, [(box, cube_to_patch(cube, lay).astype(np.float32))])
    ov = box.overlap(grid_shape)
    assert np.array_equal(back[ov[0]], probe[ov[0]].astype(np.float32))
    assert back.sum() == probe[ov[0]].astype(np.float32).sum()


def _ellipsoid(lps, centre, radii):
    return (((lps - centre) / radii) ** 2).sum(-1) <= 1.0


def test_a_synthetic_model_output_lands_where_it_belongs_on_an_oblique_flipped_volume():
    """A 'model output' drawn in the cube at the physical place of an off-centre ellipsoid must,
    after cube -> patch -> working grid -> input grid, match that ellipsoid drawn on the input
    grid directly; a wrong axis flip must not."""
    vol = _oblique_volume((40, 60, 70), (0.9, 1.2, 2.0))
    g_in = vol.grid
    work = g_in.resampled((1.5, 1.5, 1.5), extent="cover")
    click = np.array([30.0, 25.0, 20.0])
    centre = vol.ijk_to_lps(click) + np.array([8.0, -5.0, 6.0])
    radii = np.array([14.0, 9.0, 11.0])
    g_click = input_ijk_to_grid_ijk(click, g_in, work)[::-1]
    size = 32
    box = patch_around(g_click, size)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij")
    lps_in = vol.ijk_to_lps(np.stack([ii, jj, kk], -1).reshape(-1, 3))
    truth = _ellipsoid(lps_in, centre, radii).reshape(vol.array.shape)
    scores = {}
    for name, lay in [("right", layout_for(vol.direction, "ras")), ("wrong", None)]:
        if lay is None:
            good = layout_for(vol.direction, "ras")
            lay = type(good)(good.axes, (not good.flips[0],) + good.flips[1:])
        t = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
        g = np.array([cube_index_to_grid_kji(v, box, layout_for(vol.direction, "ras")) for v in t])
        cube = _ellipsoid(work.ijk_to_lps(g[:, ::-1]), centre, radii).reshape((size,) * 3).astype(np.float32)
        prob_g = blend_patches(work.shape_kji, [(box, cube_to_patch(cube, lay))], gaussian_weight(size))
        mask = resample(prob_g, work, g_in, default_value=0.0).array > 0.5
        scores[name] = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert np.array_equal(grid_to_input_mask(prob_g, work, g_in, 0.5), mask)  # the engine's shortcut
    assert scores["right"] > 0.9 and scores["wrong"] < 0.5, scores


def test_zscore_over_positive_voxels_after_clipping():
    rng = np.random.default_rng(0)
    x = rng.normal(40, 30, (8, 8, 8)).astype(np.float32)
    x[:2] = -1000.0
    x[2, 0, 0] = 3000.0
    z = zscore_patch(x)
    clipped = np.clip(x, -1000, 1000)
    pos = clipped > 0
    assert abs(z[pos].mean()) < 1e-5 and abs(z[pos].std(ddof=1) - 1) < 1e-5
    assert np.allclose(z, (clipped - clipped[pos].mean()) / clipped[pos].std(ddof=1), atol=1e-5)
    assert np.isfinite(zscore_patch(np.full((4, 4, 4), -5.0, np.float32))).all()


def test_sliding_candidates_follow_the_mask_out_of_a_patch():
    mask = np.zeros((40, 40, 200), bool)
    mask[10:30, 12:28, 20:180] = True  # an object longer than a patch along i
    box = PatchBox((0, 0, 36), 64)  # covers i 36..99; k and j reach past the volume (no faces there)
    cands = sliding_candidates([box], mask, border_voxels=2, min_border_voxels=10, step_fraction=0.5)
    assert cands == [(640, (20, 20, 36)), (640, (20, 20, 100))]  # k, j: axes shorter than a patch are centred
    assert sliding_candidates([box], mask, min_border_voxels=10, skip=[True]) == []
    assert sliding_candidates([box], mask, min_border_voxels=641) == []
    # a face at the volume's border proposes nothing
    assert sliding_candidates([PatchBox((0, 0, 136), 64)], mask, min_border_voxels=10, step_fraction=0.5) == \
        [(640, (20, 20, 136))]
    # nor does a place that other patches already cover
    two = [box, PatchBox((0, 0, 70), 64)]
    assert [c for _, c in sliding_candidates(two, mask, min_border_voxels=10, step_fraction=0.5)] == \
        [(20, 20, 36), (20, 20, 134)]


def test_click_validation_and_component_filter():
    with pytest.raises(PromptError, match="outside the volume"):
        validate_clicks((10, 20, 30), [(30.0, 2, 2)], [1])
    with pytest.raises(PromptError, match="first click must be positive"):
        validate_clicks((10, 20, 30), [(3, 2, 2)], [0])
    with pytest.raises(PromptError, match="labels"):
        validate_clicks((10, 20, 30), [(3, 2, 2)], [1, 0])
    with pytest.raises(PromptError, match="not 1"):
        validate_clicks((10, 20, 30), [(3, 2, 2)], [2])
    pts, labs = validate_clicks((10, 20, 30), [(3, 2, 2), (4, 4, 4)], [0, 1])
    assert labs == [1, 0] and pts[0] == (4.0, 4.0, 4.0)
    validate_clicks((10, 20, 30), [(3, 2, 2)], [0], first_call=False)
    m = np.zeros((5, 5, 12), np.uint8)
    m[:, :, :3] = 1
    m[:, :, 6:] = 1
    assert keep_clicked_components(m, [(8.0, 2.0, 2.0)]).sum() == m[:, :, 6:].sum()
    assert keep_clicked_components(m, [(4.0, 2.0, 2.0)]).sum() == m.sum()


# ============================================================================ engine

def _phantom_volume(direction=None):
    ph = make_phantom((24, 48, 48), (1.6, 1.6, 3.0), seed=2, n_tumors=1)
    vol = ph.to_volume()
    if direction is not None:
        vol = Volume(vol.array, vol.spacing, vol.origin, direction)
    return ph, vol


def test_engine_on_an_oblique_volume_then_refine_with_a_negative_click(tiny):
    direction = rot("z", 25) @ rot("y", 10) @ np.diag([-1.0, 1.0, 1.0])
    ph, vol = _phantom_volume(direction)
    eng = Sam3DEngine(tiny, device="cpu", settings=Sam3DSettings(grow=False))  # sliding: tested below
    liver = np.argwhere(ph.labels == 1)
    k, j, i = liver[len(liver) // 2]
    r1 = eng.segment(vol, [(float(i), float(j), float(k))], [1])
    assert r1.mask.shape == vol.array.shape and r1.mask.dtype == np.uint8 and set(np.unique(r1.mask)) <= {0, 1}
    rep = r1.report
    assert rep["patches"][0]["origin"] == "click" and np.allclose(rep["patches"][0]["centre_ijk"], (i, j, k), atol=1.0)
    assert rep["timings"]["patches_encoded"] >= 1 and rep["cube_axes"] == layout_for(direction, "ras").describe()
    n_patches = len(r1.state.patches)
    r2 = eng.segment(vol, [(float(i) + 4, float(j), float(k))], [0], previous=r1)
    assert [c["label"] for c in r2.report["clicks"]] == [1, 0]
    assert r2.report["timings"]["patches_encoded"] == 0  # the embeddings were cached
    assert r2.report["timings"]["decodes"] >= 1
    assert not torch.equal(r2.state.patches[0].logits, r1.state.patches[0].logits)  # refined ...
    assert len(r1.state.patches) == n_patches and len(r1.state.clicks_ijk) == 1  # ... without touching r1
    other = Volume(vol.array + 1, vol.spacing, vol.origin, vol.direction)
    with pytest.raises(InputError, match="another volume"):
        eng.segment(other, [(1.0, 1.0, 1.0)], [0], previous=r1)
    with pytest.raises(PromptError, match="outside"):
        eng.segment(vol, [(-3.0, 1.0, 1.0)], [1])


def test_small_volume_is_padded_and_sliding_covers_a_long_object():
    # everything-predicting model: one patch on a volume smaller than a patch
    eng = Sam3DEngine(_constant_model(4.0), device="cpu", settings=Sam3DSettings(max_patches=6))
    small = Volume(np.full((5, 7, 9), 40.0, np.float32), (1.0, 1.0, 1.0))
    r = eng.segment(small, [(4.0, 3.0, 2.0)], [1])
    assert r.mask.shape == (5, 7, 9) and r.mask.all() and len(r.state.patches) == 1
    # a long volume (150 voxels at 1.5 mm along i, patch 64): patches slide along i to cover it
    long = Volume(np.full((20, 30, 150), 40.0, np.float32), (1.5, 1.5, 1.5))
    r = eng.segment(long, [(75.0, 15.0, 10.0)], [1])
    centres_i = sorted(p["centre_ijk"][0] for p in r.report["patches"])
    assert r.mask.all() and len(centres_i) == 3 and centres_i[0] < 40 and centres_i[-1] > 110
    assert [p["origin"] for p in r.report["patches"]] == ["click", "grow", "grow"]
    # a model that finds nothing: no sliding, an empty mask
    none = Sam3DEngine(_constant_model(-4.0), device="cpu").segment(long, [(75.0, 15.0, 10.0)], [1])
    assert none.mask.sum() == 0 and len(none.state.patches) == 1


# ============================================================================ CLI

def _run_cli(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "samliverseg", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_segment_with_a_3d_model(tiny, tmp_path):
    ph, _ = _phantom_volume()
    ct = tmp_path / "ct.nii.gz"
    img = ph.to_sitk("hu")
    img.SetDirection([float(v) for v in (rot("z", 20) @ np.diag([1.0, -1.0, 1.0])).ravel()])
    sitk.WriteImage(img, str(ct))
    ck = _save({"model_state_dict": tiny.state_dict(), "epoch": 1}, tmp_path / "tiny.pth")
    out, rep = tmp_path / "seg.nii.gz", tmp_path / "rep.json"
    env = dict(os.environ, SAMLIVERSEG_CACHE=str(tmp_path / "cache"))
    liver = np.argwhere(ph.labels == 1)
    k, j, i = liver[len(liver) // 2]
    from samliverseg.io.markups import point_list, write_markups
    from samliverseg.io.volume import read_volume

    clicks = write_markups(tmp_path / "clicks.mrk.json", point_list("clicks", read_volume(ct).ijk_to_lps([[i, j, k]])),
                           coordinate_system="RAS")  # the positive click as Slicer saves it
    rc, stdout, err = _run_cli("segment", ct, "-o", out, "--model", "sam_med3d_tiny", "--checkpoint", ck,
                               "--prompts", clicks, "--negative-ijk", 2, 2, 2, "--label", 2, "--report", rep,
                               "--device", "cpu", env=env)
    assert rc == 0, err
    seg = sitk.ReadImage(str(out))
    ref = sitk.ReadImage(str(ct))
    assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetDirection(), ref.GetDirection())
    assert np.allclose(seg.GetOrigin(), ref.GetOrigin()) and np.allclose(seg.GetSpacing(), ref.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 2}
    report = json.loads(rep.read_text())
    assert report["model"] == "sam_med3d_tiny" and [c["label"] for c in report["clicks"]] == [1, 0]
    assert np.allclose(report["clicks"][0]["ijk"], (i, j, k), atol=1e-3)
    assert stdout.startswith(f"wrote {out}") and "patch(es)" in stdout


def test_cli_errors_for_3d_models(tmp_path, capsys):
    from samliverseg.cli.commands import main

    ph, _ = _phantom_volume()
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ph.to_sitk("hu"), str(ct))

    def one_line_error(rc, code, words):
        err = capsys.readouterr().err
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert rc == code and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
        for w in words:
            assert w in lines[0], (w, lines[0])

    # missing weights: exit 3, one line saying where to get them, no output file
    rc = main(["segment", str(ct), "-o", str(tmp_path / "x.nii.gz"), "--model", "sam_med3d_turbo",
               "--point-ijk", "20", "20", "10"])
    one_line_error(rc, 3, ["sam_med3d_turbo.pth", "huggingface.co/blueyo0/SAM-Med3D", "--checkpoint"])
    assert not (tmp_path / "x.nii.gz").exists()
    # boxes, points outside the volume and a negative-only first call: exit 2 before any model is loaded
    rc = main(["segment", str(ct), "-o", str(tmp_path / "y.nii.gz"), "--model", "sam_med3d", "--box-ijk", "1", "1",
               "9", "9", "3"])
    one_line_error(rc, 2, ["clicks only"])
    rc = main(["segment", str(ct), "-o", str(tmp_path / "y.nii.gz"), "--model", "sam_med3d", "--point-ijk", "20",
               "20", "99"])
    one_line_error(rc, 2, ["outside the volume"])
    rc = main(["segment", str(ct), "-o", str(tmp_path / "y.nii.gz"), "--model", "sam_med3d", "--negative-ijk", "20",
               "20", "9"])
    one_line_error(rc, 2, ["first click must be positive"])
