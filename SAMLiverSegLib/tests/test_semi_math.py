"""Semi-SAM+ arithmetic and transforms against hand-computed values (no model involved, except the
last test, which checks the embedding-cache equivalence with a tiny real encoder)."""

import math

import numpy as np
import pytest
import torch

from samliverseg.training.semi import math as sm
from samliverseg.training.semi.transforms import (GeomTransform, View, all_transforms, make_pool, resize_mask)

# Four teacher answers over four voxels (rows: members; columns: voxels), worked by hand:
#   voxel 0: 0, 0, 0, 0           -> mean 0,    Var 0
#   voxel 1: 1, 1, 0, 0           -> mean 0.5,  Var 0.25
#   voxel 2: .5, .5, .5, .5       -> mean 0.5,  Var 0
#   voxel 3: 1, .8, .6, .6        -> mean 0.75, Var (.0625 + .0025 + .0225 + .0225) / 4 = 0.0275
MASKS = torch.tensor([[0.0, 1.0, 0.5, 1.0],
                      [0.0, 1.0, 0.5, 0.8],
                      [0.0, 0.0, 0.5, 0.6],
                      [0.0, 0.0, 0.5, 0.6]])


def test_ensemble_mean_and_population_variance():
    mean, var = sm.ensemble_mean_var(MASKS)
    assert torch.allclose(mean, torch.tensor([0.0, 0.5, 0.5, 0.75]))
    assert torch.allclose(var, torch.tensor([0.0, 0.25, 0.0, 0.0275]), atol=1e-7)
    # a (M, D, H, W) stack reduces over the members only
    mean3, var3 = sm.ensemble_mean_var(MASKS.reshape(4, 1, 2, 2))
    assert mean3.shape == (1, 2, 2) and torch.allclose(var3.flatten(), var)


def test_variance_mask_and_pseudo_label():
    _, var = sm.ensemble_mean_var(MASKS)
    assert sm.variance_mask(var, 0.03).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert sm.variance_mask(var, 0.0274).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert sm.variance_mask(var, float(var[3])).tolist() == [1.0, 0.0, 1.0, 0.0]  # strict <
    valid = torch.tensor([True, True, False, True])  # voxel 2: no prompt there
    conf = sm.variance_mask(var, 0.03, valid)
    assert conf.tolist() == [1.0, 0.0, 0.0, 1.0]
    mean, _ = sm.ensemble_mean_var(MASKS)
    assert torch.allclose(sm.pseudo_label(mean, conf), torch.tensor([0.0, 0.0, 0.0, 0.75]))
    res = sm.filter_ensemble(MASKS, 0.03, valid)
    assert res["conf"].tolist() == [1.0, 0.0, 0.0, 1.0] and float(res["u_th"]) == pytest.approx(0.03)
    assert torch.allclose(res["pseudo"], torch.tensor([0.0, 0.0, 0.0, 0.75]))


def test_adaptive_threshold_raises_only_when_the_teachers_jitter():
    var = torch.tensor([0.0, 0.25, 0.0, 0.0275])
    # u_th 0.01: 2 of 4 confident. Asking for 50 % changes nothing.
    assert sm.adaptive_threshold(var, None, 0.01, 0.5, 0.2) == pytest.approx(0.01)
    # asking for 75 %: k = 3, the 3rd smallest variance is 0.0275 -> u = 0.0275 + 1e-6
    u = sm.adaptive_threshold(var, None, 0.01, 0.75, 0.2)
    assert u == pytest.approx(0.0275 + 1e-6, abs=1e-9)
    assert sm.variance_mask(var, u).tolist() == [1.0, 0.0, 1.0, 1.0]
    # capped by u_th_max
    assert sm.adaptive_threshold(var, None, 0.01, 0.75, 0.02) == pytest.approx(0.02)
    # only valid voxels count: valid = voxels 1 and 3 -> 0 of 2 confident; 50 % -> k = 1 -> 0.0275
    valid = torch.tensor([False, True, False, True])
    assert sm.adaptive_threshold(var, valid, 0.01, 0.5, 0.2) == pytest.approx(0.0275 + 1e-6, abs=1e-9)
    # off
    assert sm.adaptive_threshold(var, None, 0.01, 0.0, 0.2) == pytest.approx(0.01)


def test_rs_consistency_loss_value_and_gradient():
    p_s = torch.tensor([0.2, 0.9, 0.4, 0.5], requires_grad=True)
    p_f = torch.tensor([0.0, 0.0, 0.0, 0.75])
    conf = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = sm.rs_consistency_loss(p_s, p_f, conf)
    assert float(loss.detach()) == pytest.approx((0.04 + 0.0625) / 2)  # 0.05125
    loss.backward()
    # d/dp_s = 2 M_conf (p_s - p_f) / sum M_conf
    assert torch.allclose(p_s.grad, torch.tensor([0.2, 0.0, 0.0, -0.25]))
    q = torch.tensor([0.3, 0.6], requires_grad=True)
    none = sm.rs_consistency_loss(q, torch.zeros(2), torch.zeros(2))
    assert float(none.detach()) == 0.0
    none.backward()
    assert torch.equal(q.grad, torch.zeros(2))


def test_consistency_loss():
    p_s = torch.tensor([0.2, 0.9], requires_grad=True)
    p_t = torch.tensor([0.4, 0.5], requires_grad=True)
    loss = sm.consistency_loss(p_s, p_t)
    assert float(loss.detach()) == pytest.approx((0.04 + 0.16) / 2)
    loss.backward()
    assert p_t.grad is None  # the teacher side is detached
    assert torch.allclose(p_s.grad, torch.tensor([-0.2, 0.4]))


def test_ramps():
    # mean-teacher ramp-up exp(-5 (1 - x)^2)
    assert sm.rampup(0.0) == pytest.approx(math.exp(-5.0))  # 0.006737947
    assert sm.rampup(0.5) == pytest.approx(0.2865048, rel=1e-6)
    assert sm.rampup(1.0) == 1.0 and sm.rampup(3.0) == 1.0 and sm.rampup(-1.0) == pytest.approx(math.exp(-5.0))
    assert sm.rampup(0.3, "linear") == pytest.approx(0.3) and sm.rampup(2, "linear") == 1.0
    assert sm.rampup(0.0, "logistic") == 0.5  # the literal sigmoid(t/T_r): no ramp-up at t = 0
    with pytest.raises(ValueError):
        sm.rampup(0.5, "cosine")
    # λ(t) = λ_max r(t / T_r): defaults λ_max 1, T_r 10
    assert sm.consistency_weight(5.0) == pytest.approx(0.2865048, rel=1e-6)
    assert sm.consistency_weight(10.0, lambda_max=2.0) == pytest.approx(2.0)
    assert sm.consistency_weight(3.0, t_r=0.0) == 1.0
    # β(t) = β_max exp(-t / T_d): defaults 0.3, 40
    assert sm.pseudo_weight(0.0) == pytest.approx(0.3)
    assert sm.pseudo_weight(40.0) == pytest.approx(0.3 / math.e)  # 0.110364
    assert sm.pseudo_weight(20.0, beta_max=1.0, t_d=10.0) == pytest.approx(math.exp(-2.0))
    # poly LR
    assert sm.poly_lr(1e-3, 5, 10) == pytest.approx(1e-3 * 0.5 ** 0.9)  # 5.358867e-4
    assert sm.poly_lr(1e-3, 0, 10) == pytest.approx(1e-3) and sm.poly_lr(1e-3, 10, 10) == 0.0


def test_ema_update_by_hand():
    ema = {"w": torch.tensor([2.0, -1.0]), "n": torch.tensor(3)}
    student = {"w": torch.tensor([4.0, 1.0]), "n": torch.tensor(7)}
    new = sm.ema_update(ema, student, 0.99)
    assert torch.allclose(new["w"], torch.tensor([2.02, -0.98]))  # 0.99*2 + 0.01*4, 0.99*-1 + 0.01*1
    assert int(new["n"]) == 7  # integer buffers are copied
    assert torch.equal(ema["w"], torch.tensor([2.0, -1.0]))  # pure
    with pytest.raises(ValueError):
        sm.ema_update({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    # the warm start: m_t = min(m, 1 - 1/t) for the t-th update -> the running mean at first
    assert [sm.ema_momentum(0.99, n) for n in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert sm.ema_momentum(0.99, 99) == pytest.approx(0.99) and sm.ema_momentum(0.99, 500) == 0.99
    assert sm.ema_momentum(0.99, 0, warm_start=False) == 0.99
    e = {"w": torch.tensor(10.0)}
    for n, v in enumerate([1.0, 2.0, 6.0]):
        e = sm.ema_update(e, {"w": torch.tensor(v)}, sm.ema_momentum(0.99, n))
    assert float(e["w"]) == pytest.approx(3.0)  # (1 + 2 + 6) / 3: the initial 10 is gone
    # in place on modules, twice: θ' = .5 (.5 * 1 + .5 * 3) + .5 * 3 = 2.5
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        a.weight.fill_(1.0), b.weight.fill_(3.0)
    sm.ema_update_(a.parameters(), b.parameters(), 0.5)
    sm.ema_update_(a.parameters(), b.parameters(), 0.5)
    assert float(a.weight.detach()) == pytest.approx(2.5)


def test_point_sampling():
    m = torch.zeros(3, 4, 5, dtype=torch.bool)
    m[0, 2, 3] = True  # the only pixel of slice 0: (x = 3, y = 2)
    m[2, 1:3, 0:2] = True
    g = torch.Generator().manual_seed(0)
    pts, valid = sm.sample_points_per_slice(m, g)
    assert valid.tolist() == [True, False, True]
    assert pts[0].tolist() == [3.0, 2.0]
    x, y = int(pts[2, 0]), int(pts[2, 1])
    assert m[2, y, x]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sm.sample_points_per_slice(m, g1)[0], sm.sample_points_per_slice(m, g2)[0])
    p = sm.sample_point_3d(m, torch.Generator().manual_seed(1))
    assert m[p]
    assert sm.sample_point_3d(torch.zeros(2, 2, 2), torch.Generator()) is None


# ------------------------------------------------------------------------------------ transforms
def test_geometric_transform_hand_values():
    x = torch.tensor([[[1, 2, 3], [4, 5, 6]],
                      [[7, 8, 9], [10, 11, 12]]])  # (D=2, H=2, W=3)
    t = GeomTransform(rot90=1)
    assert t.apply(x)[0].tolist() == [[3, 6], [2, 5], [1, 4]]  # a quarter turn from j towards i
    assert t.out_hw((2, 3)) == (3, 2) and t.spacing((0.7, 0.9, 2.5)) == (0.9, 0.7, 2.5)
    assert GeomTransform(flip_i=True).apply(x)[1].tolist() == [[9, 8, 7], [12, 11, 10]]
    assert GeomTransform(flip_k=True).apply(x)[0].tolist() == [[7, 8, 9], [10, 11, 12]]
    # T = F_k F_i R: first rotate, then flip along i, then along k
    y = GeomTransform(1, True, True).apply(x)
    assert y[0].tolist() == [[12, 9], [11, 8], [10, 7]]


@pytest.mark.parametrize("shape", [(5, 6, 6), (4, 7, 9)])
def test_round_trip_on_masks_all_transforms(shape):
    rng = np.random.RandomState(0)
    mask = rng.rand(*shape) > 0.6
    logits = torch.randn(2, 1, *shape)
    ts = all_transforms()
    assert len(set(ts)) == 16
    for t in ts:
        fwd = t.apply(torch.from_numpy(mask))
        assert tuple(fwd.shape[-2:]) == t.out_hw(shape[1:])
        assert int(fwd.sum()) == int(mask.sum())  # a voxel permutation
        assert torch.equal(t.invert(fwd), torch.from_numpy(mask))  # T^-1 T = id, bit for bit
        assert np.array_equal(t.invert(t.apply(mask)), mask)  # numpy too
        assert torch.equal(t.apply(t.invert(fwd)), fwd)  # T T^-1 = id
        assert torch.equal(t.invert(t.apply(logits)), logits)  # leading axes pass through
    # distinct transforms really differ on an asymmetric mask
    outs = {t: t.apply(torch.from_numpy(mask)) for t in ts}
    same_shape = [t for t in ts if outs[t].shape == outs[ts[0]].shape]
    assert len({outs[t].numpy().tobytes() for t in same_shape}) == len(same_shape)


def test_views_pool_and_intensity():
    pool = make_pool(7, 3, 2)
    assert pool.weak[0] == View() and pool.weak[0].geom.is_identity
    assert len({(v.rot90, v.flip_i) for v in pool.weak}) == 3  # distinct in-plane elements
    assert [v.intensity for v in pool.all] == ["none", "weak", "weak", "strong", "strong"]
    assert make_pool(7, 3, 2) == pool and make_pool(8, 3, 2) != pool
    vol = (np.arange(4 * 6 * 8) % 251).reshape(4, 6, 8).astype(np.uint8)
    assert np.array_equal(pool.weak[0].image(vol), vol.astype(np.float32))
    for v in pool.all[1:]:
        a, b = v.image(vol), v.image(vol)
        assert np.array_equal(a, b)  # seeded: a pure function of volume and view
        assert a.shape == v.geom.apply(vol).shape and a.min() >= 0 and a.max() <= 255
        assert not np.array_equal(a, v.geom.apply(vol).astype(np.float32))  # the intensity did change
    strong = np.abs(pool.strong[0].image(vol) - pool.strong[0].geom.apply(vol)).mean()
    weak = np.abs(pool.weak[1].image(vol) - pool.weak[1].geom.apply(vol)).mean()
    assert strong > weak


def test_resize_mask():
    m = np.zeros((2, 8, 8), dtype=bool)
    m[:, 0:4, 0:4] = True
    r = resize_mask(m, (4, 4))
    assert r.shape == (2, 4, 4) and r[:, :2, :2].all() and not r[:, 2:, :].any() and not r[:, :, 2:].any()


def test_cached_view_embedding_equals_embedding_the_transformed_slab():
    """The cache's claim: E(T(x[z:z+D])) = flip_k(E_view[z:z+D]) for a per-slice encoder."""
    from libtest_helpers import build_tiny_sam, tiny_sam_spec
    from samliverseg.modeling.slicing_student import student_from_sam

    torch.manual_seed(0)
    sam = build_tiny_sam()
    sam.spec = tiny_sam_spec("tiny_eq", description="t", builder=lambda: sam, checkpoint_filename="x.pth",
                             window="wide", normalization="minmax01")
    student = student_from_sam(sam, slab_depth=3, hidden=8).eval()
    vol = (np.random.RandomState(1).rand(6, 20, 20) * 255).astype(np.uint8)
    view = make_pool(3, 4, 0).weak[2]
    cached = student.embed(torch.from_numpy(view.image(vol)))  # the whole block, once
    z = 2
    for flip_k in (False, True):
        t = view.geom.with_depth_flip(flip_k)
        # what an on-the-fly pipeline does: crop the slab, transform it, weak intensity, encode
        slab_img = view.image(vol)[z:z + 3]
        direct = student.embed(torch.from_numpy(np.ascontiguousarray(slab_img[::-1] if flip_k else slab_img)))
        from_cache = cached[z:z + 3].flip(0) if flip_k else cached[z:z + 3]
        assert torch.allclose(direct, from_cache, atol=1e-5)
        # and the geometry of the view is the transform T applied to the raw slab
        assert np.array_equal(t.apply(vol[z:z + 3].astype(np.float32)).shape, slab_img.shape)
    # an in-plane flip does NOT commute with the encoder (why views are embedded separately)
    flipped = student.embed(torch.from_numpy(vol[:, :, ::-1].astype(np.float32).copy()))
    plain = student.embed(torch.from_numpy(vol.astype(np.float32)))
    assert not torch.allclose(flipped, plain.flip(-1), atol=1e-3)
