"""The inference worker (``samliverseg worker``) and its protocol (WORKER_PROTOCOL.md).

Units of the protocol (framing, request checks, array files, error categories, RAS prompts), then
a real worker subprocess with the real LiteMedSAM weights on a small phantom: its masks equal the
in-process engine's and the CLI's for the same prompt on identity, flipped and oblique volumes; a
``kill -9`` in the middle of a request gives a clear error and the next request restarts it with
the same mask; a client of another protocol version is refused; bad requests get one-line errors
with the CLI's exit codes. The client is the Slicer module's own (``SAMLiverSegLogic.worker_client``,
Qt-free and torch-free).
"""

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from libtest_helpers import rot
from samliverseg.core.errors import CancelledError, CheckpointError, InputError, PromptError
from samliverseg.core.evaluation import dice
from samliverseg.core.maskutil import bbox_2d, middle_slice
from samliverseg.core.prompts import Prompts, Roi3D, SliceBox
from samliverseg.demo.phantom import make_phantom
from samliverseg.interactive.engine import PromptEngine
from samliverseg.interactive.uncertainty import ensemble_uncertainty
from samliverseg.io.volume import Volume
from samliverseg.service import protocol
from samliverseg.service.handlers import prompts_from_request, slice_axis_for_normal, volume_from_ijk_to_ras

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SAMLiverSeg"))

from SAMLiverSegLogic.worker_client import WorkerClient, WorkerError  # noqa: E402

SPACING = (2.5, 2.5, 4.0)


def ijk_to_ras(direction_ras, origin_ras, spacing=SPACING):
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction_ras, float) @ np.diag(spacing)
    m[:3, 3] = origin_ras
    return m


#: The same voxels under three geometries: RAS-aligned; LPS-aligned with k reversed; rotated.
GEOMETRIES = {
    "identity": ijk_to_ras(np.eye(3), (0.0, 0.0, 0.0)),
    "flipped": ijk_to_ras(np.diag([-1.0, -1.0, -1.0]), (120.5, 95.25, -40.0)),
    "oblique": ijk_to_ras(rot("x", 12) @ rot("z", 25), (-30.0, 12.0, 7.5)),
}


# -- protocol units ----------------------------------------------------------------------------------

def test_framing_is_one_json_object_per_line():
    line = protocol.encode({"id": 3, "x": np.float32(1.5), "a": np.arange(3), "nan": float("nan")})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line) == {"id": 3, "x": 1.5, "a": [0, 1, 2], "nan": None}
    for bad in (b"{not json\n", b"[1, 2]\n", b"\xff\xfe\n"):
        with pytest.raises(protocol.ProtocolError) as err:
            protocol.decode(bad)
        assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert protocol.is_final({"id": 1, "ok": True}) and not protocol.is_final({"id": 1, "event": "progress"})


@pytest.mark.parametrize("request_, words", [
    ({"type": "status"}, "integer \"id\""),
    ({"id": "7", "type": "status"}, "integer \"id\""),
    ({"id": 1, "type": "segment"}, "unknown request type 'segment'"),
    ({"id": 1, "type": "hello"}, "missing field 'protocol'"),
    ({"id": 1, "type": "prompt", "pionts": []}, "unknown field 'pionts'"),
    ({"id": 1, "type": "prompt", "points": "1,2,3"}, "field 'points' must be a list"),
    ({"id": 1, "type": "prefetch", "around": True}, "field 'around' must be a int or float"),
    ({"id": 1, "type": "uncertainty"}, "missing field 'mask'"),
])
def test_bad_requests_are_refused_in_one_line(request_, words):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.check_request(request_)
    assert words in str(err.value) and err.value.exit_code == 2


def test_every_documented_request_type_is_checked():
    assert set(protocol.REQUEST_FIELDS) == set(protocol.REQUEST_TYPES)
    page = (REPO / protocol.PROTOCOL_PAGE).read_text()
    assert f"Protocol version {protocol.PROTOCOL_VERSION}" in page
    for rtype in protocol.REQUEST_TYPES:
        assert f"### `{rtype}`" in page, rtype
        for field in protocol.REQUEST_FIELDS[rtype]:
            assert f"`{field}`" in page, (rtype, field)


def test_array_files_round_trip_and_are_checked(tmp_path):
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 2, 3] = True
    ref = protocol.write_array(str(tmp_path), "m", mask)
    assert ref["dtype"] == "|u1" and ref["shape"] == [3, 4, 5]
    np.testing.assert_array_equal(protocol.read_array(ref), mask.astype(np.uint8))
    hu = np.linspace(-1000, 400, 60, dtype=np.float32).reshape(3, 4, 5)
    np.testing.assert_array_equal(protocol.read_array(protocol.write_array(str(tmp_path), "v", hu)), hu)
    assert not list(tmp_path.glob("*.part"))
    wrong = dict(ref, shape=[3, 4, 6])
    with pytest.raises(protocol.ProtocolError, match="the reference says"):
        protocol.read_array(wrong)
    pickled = tmp_path / "p.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(protocol.ProtocolError, match="cannot read"):
        protocol.read_array({"npy": str(pickled), "shape": [1], "dtype": "|O"})
    with pytest.raises(protocol.ProtocolError, match="not found"):
        protocol.read_array(dict(ref, npy=str(tmp_path / "gone.npy")))
    with pytest.raises(protocol.ProtocolError, match="not a .npy"):
        protocol.read_array(dict(ref, npy=str(tmp_path / "x.pkl")))


@pytest.mark.parametrize("exc, code", [
    (InputError("no such file"), 2), (PromptError("outside"), 2), (CheckpointError("corrupt"), 3),
    (MemoryError(), 4), (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), 4),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), 4), (CancelledError("stop"), 130),
    (ValueError("bad\nthing"), 70),
])
def test_errors_fall_in_the_cli_exit_code_categories(exc, code):
    resp = protocol.error_response(5, exc)
    assert resp["id"] == 5 and resp["ok"] is False and resp["exit_code"] == code
    assert "\n" not in resp["error"] and resp["error"]


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_ras_prompts_land_on_the_same_voxels_as_ijk_prompts(name):
    m = GEOMETRIES[name]
    vol = volume_from_ijk_to_ras(np.zeros((20, 30, 40), np.float32), m)
    np.testing.assert_allclose(vol.ijk_to_ras_matrix(), m, atol=1e-9)
    # the volume's axes: an axial view cuts across k, a coronal one across j, a sagittal one across i
    assert [slice_axis_for_normal(m, protocol.ORIENTATION_NORMALS[o]) for o in ("axial", "coronal", "sagittal")] \
        == ["k", "j", "i"]
    to_ras = lambda pts: (m @ np.c_[np.asarray(pts, float), np.ones(len(pts))].T).T[:, :3].tolist()  # noqa: E731
    pos, neg = [12.0, 7.0, 9.0], [20.25, 11.5, 9.0]
    off_slice = [14.0, 8.0, 9.3]  # a click 0.3 voxel off the slice snaps onto it
    req = {"points": to_ras([pos, neg, off_slice]), "labels": [1, 0, 1],
           "box": to_ras([[5.0, 4.0, 9.0], [30.0, 22.0, 9.4]]), "orientation": "axial"}
    p = prompts_from_request(req, vol)
    assert p.slice_axis == "k" and p.slice_indices() == [9]
    assert p.positive == [tuple(pos), (14.0, 8.0, 9.0)] and p.negative == [tuple(neg)]
    assert p.box.corner_a == (5.0, 4.0, 9.0) and p.box.corner_b == (30.0, 22.0, 9.0)
    q = prompts_from_request({"frame": "ijk", "points": [pos], "slice_axis": "j"}, vol)
    assert q.positive == [tuple(pos)] and q.slice_axis == "j"
    roi = prompts_from_request({"roi": to_ras([[2.0, 3.0, 4.0], [12.0, 13.0, 8.0]]), "box": req["box"]}, vol).roi
    assert (roi.i0, roi.j0, roi.k0, roi.i1, roi.j1, roi.k1) == (2.0, 3.0, 4.0, 12.0, 13.0, 8.0)
    # boxes on several slices: each corner pair snaps onto its own slice
    multi = prompts_from_request({"box": req["box"], "boxes": [to_ras([[6.0, 5.0, 13.2], [25.0, 20.0, 12.9]])]}, vol)
    assert [b.corner_a for b in multi.all_boxes()] == [(5.0, 4.0, 9.0), (6.0, 5.0, 13.0)]
    assert multi.boxes[0].corner_b == (25.0, 20.0, 13.0) and multi.slice_indices() == [9, 13]
    for bad, words in (({"frame": "lps"}, "frame"), ({"orientation": "oblique"}, "orientation"),
                       ({"slice_axis": "k"}, "frame 'ijk'"), ({"points": [[1, 2]]}, "[x, y, z]"),
                       ({"points": [[1, 2, 3]], "labels": [2]}, "labels"), ({"points": [[1, 2, 3], [1, 2]]}, "[x, y, z]"),
                       ({"frame": "ijk", "roi": [1, 2, 3, "a", 5, 6]}, "roi"),
                       ({"boxes": [[[1, 2, 3]]]}, "two opposite corners")):
        with pytest.raises(protocol.ProtocolError, match=words):
            prompts_from_request(bad, vol)


def test_prompt_fields_give_the_worker_exactly_the_in_process_prompts():
    vol = volume_from_ijk_to_ras(np.zeros((20, 30, 40), np.float32), GEOMETRIES["oblique"])
    cases = [Prompts(positive=[(12.25, 7.5, 9.4), (3.0, 4.0, 11.0)], negative=[(20.0, 11.5, 9.0)], slice_axis="j"),
             Prompts(box=SliceBox((5.0, 4.0, 9.0), (30.0, 22.0, 9.0)), roi=Roi3D(2, 3, 4, 35, 25, 15)),
             Prompts(roi=Roi3D(1.0, 2.0, 3.0, 10.0, 12.0, 14.0), negative=[(5.0, 5.0, 5.0)]),
             Prompts(box=SliceBox((5.0, 4.0, 3.0), (30.0, 22.0, 3.0)), positive=[(9.0, 9.0, 11.0)],
                     boxes=[SliceBox((6.0, 4.0, 7.0), (28.0, 20.0, 7.0)), SliceBox((7.5, 5.0, 12.0), (25.0, 19.0, 12.0))])]
    for p in cases:
        fields = protocol.prompt_fields(p)
        assert protocol.check_request(dict(fields, id=1, type="propagate", propagate=False))
        assert prompts_from_request(json.loads(json.dumps(fields)), vol) == p


# -- a real worker -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def phantom():
    return make_phantom((64, 128, 128), SPACING, seed=1, n_tumors=1)


@pytest.fixture(scope="module")
def volumes(phantom):
    """The phantom's voxels under each geometry (identity: the phantom itself, RAS-aligned)."""
    return {name: volume_from_ijk_to_ras(phantom.hu, m) for name, m in GEOMETRIES.items()}


@pytest.fixture(scope="module")
def liver_box(phantom):
    k = middle_slice(phantom.liver_mask)
    i0, j0, i1, j1 = bbox_2d(phantom.liver_mask[k])
    return [[i0 - 3.0, j0 - 3.0, float(k)], [i1 + 3.0, j1 + 3.0, float(k)]]


@pytest.fixture(scope="module")
def engine(volumes):
    eng = PromptEngine("lite_medsam", device="cpu")
    eng.set_volume(volumes["identity"])
    return eng


@pytest.fixture(scope="module")
def client():
    with WorkerClient(device="cpu") as c:
        yield c


def ras(volume: Volume, ijk):
    return volume.ijk_to_ras(np.asarray(ijk, float)).tolist()


@pytest.fixture(scope="module")
def identity_results(client, engine, volumes, liver_box, phantom):
    """One 2D prompt and one propagation (2 slices) through the worker, and the same in process."""
    vol = volumes["identity"]
    client.request("load_volume", array=client.write_array("vol", phantom.hu), ijk_to_ras=vol.ijk_to_ras_matrix())
    k = int(liver_box[0][2])
    events = []
    r2 = client.request("prompt", box=ras(vol, liver_box), orientation="axial")
    roi_ras = ras(vol, [[0, 0, k], [127, 127, k + 1]])
    rid = client.send("propagate", box=ras(vol, liver_box), roi=roi_ras)
    r3 = client.wait(rid, on_event=events.append)
    assert r3["ok"], r3
    box = SliceBox(tuple(liver_box[0]), tuple(liver_box[1]))
    return {"k": k, "prompt": r2, "mask2d": client.read_array(r2["mask"]),
            "propagate": r3["result"], "mask3d": client.read_array(r3["result"]["mask"]), "events": events,
            "ref2d": engine.segment_slice(Prompts(box=box)),
            "ref3d": engine.segment(Prompts(box=box, roi=Roi3D(0, 0, k, 127, 127, k + 1)))}


def test_worker_masks_equal_the_in_process_engine(identity_results):
    r = identity_results
    assert r["prompt"]["slice_axis"] == "k" and r["prompt"]["slice_index"] == r["k"]
    assert r["mask2d"].dtype == np.uint8 and r["mask2d"].sum() > 200
    np.testing.assert_array_equal(r["mask2d"], r["ref2d"].mask)
    assert r["prompt"]["score"] == pytest.approx(r["ref2d"].score, abs=1e-6)
    assert r["mask3d"].shape == (64, 128, 128)
    assert sorted(np.flatnonzero(r["mask3d"].any(axis=(1, 2)))) == [r["k"], r["k"] + 1]
    np.testing.assert_array_equal(r["mask3d"], r["ref3d"].mask)
    assert r["propagate"]["report"]["voxels"] == r["ref3d"].report["voxels"]
    progress = [e for e in r["events"] if e.get("event") == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]



def test_worker_status_says_what_runs_the_model(client, identity_results):
    backend = client.request("status")["backend"]  # open since the first embedding
    assert backend["name"] in ("torch", "openvino", "onnxruntime") and backend["decoder_precision"] == "fp32"
    assert backend["precision"] == "fp32" and isinstance(backend["notes"], list)


def test_worker_uncertainty_equals_the_in_process_ensemble(client, engine, identity_results):
    mask = np.zeros_like(identity_results["mask3d"])  # one slice: its neighbours' embeddings are cached
    mask[identity_results["k"] + 1] = identity_results["mask3d"][identity_results["k"] + 1]
    res = client.request("uncertainty", mask=client.write_array("mask", mask), members=4)
    variance = client.read_array(res["variance"])
    ref = ensemble_uncertainty(engine, mask, members=4)
    np.testing.assert_array_equal(variance, ref.variance)
    assert res["slices"] == ref.slices and res["members"] == ref.members
    assert res["uncertain_fraction"] == pytest.approx(ref.uncertain_fraction())


@pytest.mark.parametrize("name", ["flipped", "oblique"])
def test_worker_mask_equals_on_flipped_and_oblique_volumes(client, volumes, liver_box, identity_results, name):
    """Same voxels, another geometry, the prompt in that geometry's RAS: the box lands on the same
    voxels, and the mask is the in-process engine's on that geometry (which turns the slice upright
    by its geometry before the model sees it: ``slice_view``)."""
    vol = volumes[name]
    client.request("load_volume", array=client.write_array("vol", vol.array), ijk_to_ras=vol.ijk_to_ras_matrix())
    res = client.request("prompt", box=ras(vol, liver_box), orientation="axial")
    assert (res["slice_axis"], res["slice_index"]) == ("k", identity_results["k"])
    np.testing.assert_allclose(res["ijk_to_ras"], GEOMETRIES[name], atol=1e-9)
    eng = PromptEngine("lite_medsam", device="cpu")
    eng.set_volume(vol)
    ref = eng.segment_slice(Prompts(box=SliceBox(tuple(liver_box[0]), tuple(liver_box[1]))))
    mask = client.read_array(res["mask"])
    np.testing.assert_array_equal(mask, ref.mask)
    assert dice(mask, identity_results["mask2d"]) > 0.9  # the same liver, seen turned or not


def test_boxes_on_several_slices_propagate_as_in_process(client, engine, volumes, phantom, identity_results):
    """Corrections on several slices (``boxes``) through the worker: the in-process engine's mask."""
    vol = volumes["identity"]
    client.request("load_volume", array=client.write_array("vol", phantom.hu), ijk_to_ras=vol.ijk_to_ras_matrix())
    k = identity_results["k"]
    boxes = []
    for kk in (k, k + 2):
        i0, j0, i1, j1 = bbox_2d(phantom.liver_mask[kk])
        boxes.append(SliceBox((i0 - 3.0, j0 - 3.0, float(kk)), (i1 + 3.0, j1 + 3.0, float(kk))))
    prompts = Prompts(box=boxes[0], boxes=boxes[1:], roi=Roi3D(0, 0, k, 127, 127, k + 2))
    res = client.request("propagate", box=ras(vol, [boxes[0].corner_a, boxes[0].corner_b]),
                         boxes=[ras(vol, [boxes[1].corner_a, boxes[1].corner_b])],
                         roi=ras(vol, [[0, 0, k], [127, 127, k + 2]]), timeout=600)
    ref = engine.segment(prompts)
    mask = client.read_array(res["mask"])
    assert sorted(np.flatnonzero(mask.any(axis=(1, 2)))) == [k, k + 1, k + 2]
    np.testing.assert_array_equal(mask, ref.mask)


@pytest.mark.slow
def test_worker_mask_equals_the_cli(tmp_path, client, volumes, liver_box, identity_results):
    import SimpleITK as sitk

    image = tmp_path / "ct.nrrd"
    sitk.WriteImage(volumes["identity"].to_sitk(), str(image))
    (i0, j0, k), (i1, j1, _) = liver_box
    out = tmp_path / "liver.nii.gz"
    cmd = [sys.executable, "-m", "samliverseg", "segment", str(image), "-o", str(out), "--device", "cpu",
           "--box-ijk", str(i0), str(j0), str(i1), str(j1), str(k),
           "--roi-ijk", "0", "0", str(k), "127", "127", str(k + 1)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    cli_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    np.testing.assert_array_equal(cli_mask, identity_results["mask3d"])


def test_kill_9_mid_request_gives_a_clear_error_and_the_next_request_restarts(client, volumes, liver_box,
                                                                              identity_results):
    vol = volumes["identity"]
    client.request("load_volume", array=client.write_array("vol", vol.array), ijk_to_ras=vol.ijk_to_ras_matrix())
    first_pid = client.pid
    rid = client.send("prefetch", range=[0, 63], around=identity_results["k"])
    events = []
    while not events:  # the first slice is embedded
        select.select([client.fileno()], [], [], 0.5)
        events += [m for m in client.poll() if m.get("id") == rid]
    busy = client.request("status")  # answered by the reader thread while the main thread computes
    assert busy["busy"] is None or busy["busy"]["id"] == rid
    assert [p["id"] for p in busy["prefetch"]] == [rid]
    os.kill(first_pid, signal.SIGKILL)
    resp = client.wait(rid, timeout=60)
    assert resp["ok"] is False and resp["exit_code"] == 70
    assert "killed (SIGKILL" in resp["error"] and "the next request restarts it" in resp["error"]
    assert "\n" not in resp["error"]
    res = client.request("prompt", box=ras(vol, liver_box), orientation="axial", timeout=600)
    assert client.pid != first_pid and client.starts == 2
    np.testing.assert_array_equal(client.read_array(res["mask"]), identity_results["mask2d"])


def _wait_for(client, rid, what):
    """Wait (as a notifier would) until a message of ``rid`` satisfies ``what``; the messages of it."""
    got = []
    while not any(what(m) for m in got):
        assert select.select([client.fileno()], [], [], 120)[0], "the worker sent nothing for 120 s"
        got += [m for m in client.poll() if m.get("id") == rid]
    return got


def _killed(resp):
    assert resp["ok"] is False and resp["exit_code"] == 70, resp
    assert "killed (SIGKILL" in resp["error"] and "the next request restarts it" in resp["error"]
    assert "\n" not in resp["error"]


def test_a_propagation_reports_progress_and_stops_on_cancel(client, volumes, liver_box):
    vol = volumes["identity"]
    client.request("load_volume", array=client.write_array("vol", vol.array), ijk_to_ras=vol.ijk_to_ras_matrix())
    rid = client.send("propagate", box=ras(vol, liver_box))  # the whole volume: many slices
    first = _wait_for(client, rid, lambda m: m.get("event") == "progress")[0]
    assert first["stage"] == "propagate" and first["done"] < first["total"]
    client.cancel(rid)
    resp = client.wait(rid, timeout=300)
    assert resp["ok"] is False and resp["exit_code"] == 130 and "cancel" in resp["error"] and "\n" not in resp["error"]
    for _ in range(100):  # nothing left running (the worker clears "busy" just after its answer)
        if client.request("status")["busy"] is None:
            break
        select.select([], [], [], 0.05)
    else:
        raise AssertionError("the cancelled propagation still runs")


def test_kill_9_mid_propagate_and_mid_prompt_then_the_same_masks(client, volumes, liver_box, identity_results):
    vol = volumes["identity"]
    k = identity_results["k"]
    client.request("load_volume", array=client.write_array("vol", vol.array), ijk_to_ras=vol.ijk_to_ras_matrix())
    # a propagation through the whole volume, killed after its first slice
    starts = client.starts
    rid = client.send("propagate", box=ras(vol, liver_box))
    _wait_for(client, rid, lambda m: m.get("event") == "progress")
    os.kill(client.pid, signal.SIGKILL)
    _killed(client.wait(rid, timeout=60))
    # the next request restarts the worker and reloads the volume: the same mask as before
    roi_ras = ras(vol, [[0, 0, k], [127, 127, k + 1]])
    again = client.request("propagate", box=ras(vol, liver_box), roi=roi_ras, timeout=600)
    assert client.starts == starts + 1
    np.testing.assert_array_equal(client.read_array(again["mask"]), identity_results["mask3d"])
    # a prompt killed while it embeds its slice (a new volume: nothing cached)
    for _ in range(3):
        client.request("load_volume", array=client.write_array("vol", vol.array), ijk_to_ras=vol.ijk_to_ras_matrix())
        rid = client.send("prompt", box=ras(vol, liver_box), orientation="axial")
        while rid in client.pending():  # until the worker is on it (status is answered meanwhile)
            busy = client.request("status", timeout=60)["busy"]
            if busy is not None and busy["id"] == rid:
                os.kill(client.pid, signal.SIGKILL)
                break
        resp = client.wait(rid, timeout=120)
        if not resp["ok"]:
            break  # killed mid-prompt (else it finished just before the kill: once more)
        client.read_array(resp["result"]["mask"])
    _killed(resp)
    res = client.request("prompt", box=ras(vol, liver_box), orientation="axial", timeout=600)
    np.testing.assert_array_equal(client.read_array(res["mask"]), identity_results["mask2d"])


def test_out_of_memory_in_the_worker_is_exit_code_4_and_it_goes_on(client, tmp_path):
    """A request for an absurd size: the worker's own allocation fails (MemoryError), not the worker."""
    if open("/proc/sys/vm/overcommit_memory").read().strip() == "1":
        pytest.skip("with overcommit_memory=1 a huge allocation succeeds and the kernel kills instead")
    shape = (8192, 8192, 8192)  # int16: a sparse 1 TiB file; as float32 HU it needs 4 TiB
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False, "shape": shape})
        f.truncate(f.tell() + 2 * int(np.prod(shape, dtype=np.int64)))
    client.request("load_volume", array=client.write_array("v", np.zeros((4, 8, 8), np.int16)),
                   ijk_to_ras=np.eye(4).tolist(), timeout=600)
    pid = client.request("status")["pid"]
    resp = client.wait(client.send("load_volume", array={"npy": str(huge), "shape": list(shape), "dtype": "<i2"},
                                   ijk_to_ras=np.eye(4).tolist()), timeout=300)
    assert resp["ok"] is False and resp["exit_code"] == 4, resp
    assert resp["error"].startswith("out of memory (cpu): close other programs or use a smaller volume (")
    assert "TiB" in resp["error"] and "\n" not in resp["error"]  # numpy's own words: how much it wanted
    status = client.request("status")  # the same worker goes on, its volume unchanged
    assert status["pid"] == pid and status["volume"]["shape_kji"] == [4, 8, 8]


def test_shutdown_kills_the_whole_tree_of_a_launcher(tmp_path):
    """Slicer starts the worker through PythonSlicer, a launcher that runs Python as its child and
    forwards no signal: a shell script that does the same stands in for it (a real process tree)."""
    import psutil

    launcher = tmp_path / "launcher.sh"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\n')  # no exec: Python is the shell's child
    launcher.chmod(0o755)
    c = WorkerClient(python=str(launcher), device="cpu")
    try:
        python_pid = c.request("status", timeout=300)["pid"]
        assert python_pid != c.pid and psutil.Process(python_pid).ppid() == c.pid
        c.request("load_volume", array=c.write_array("v", np.zeros((40, 64, 64), np.int16)),
                  ijk_to_ras=np.eye(4).tolist(), timeout=600)
        rid = c.send("prefetch", range=[0, 39])
        _wait_for(c, rid, lambda m: m.get("event") == "progress")
        launcher_pid = c.pid
        os.kill(python_pid, signal.SIGSTOP)  # a worker that cannot stop in time (hung), whatever the load
        c.shutdown_timeout = 0.5
        c.shutdown()
        assert {launcher_pid, python_pid} <= set(c.killed_pids)
        assert not _group_alive(launcher_pid)
    finally:
        c.shutdown()
    # a launcher whose Python is killed exits with 128 + 9: the client still says what happened,
    # and what the worker forked (e.g. while it embeds) is ended with it
    c = WorkerClient(python=str(launcher), device="cpu")
    try:
        python_pid = c.request("status", timeout=300)["pid"]
        c.request("load_volume", array=c.write_array("v", np.zeros((40, 64, 64), np.int16)),
                  ijk_to_ras=np.eye(4).tolist(), timeout=600)
        launcher_pid = c.pid
        rid = c.send("prefetch", range=[0, 39])
        _wait_for(c, rid, lambda m: m.get("event") == "progress")
        os.kill(python_pid, signal.SIGKILL)
        _killed(c.wait(rid, timeout=120))
        assert not _group_alive(launcher_pid)
    finally:
        c.shutdown()


def _group_alive(pgid):
    """The live (not zombie) processes of a process group, after at most 10 s for SIGKILLs sent to land."""
    import psutil

    for _ in range(100):
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        if not alive:
            return alive
        select.select([], [], [], 0.1)
    return alive


def test_bad_requests_to_a_real_worker_get_one_line_errors(client, volumes):
    vol = volumes["identity"]
    client.request("load_volume", array=client.write_array("vol", vol.array), ijk_to_ras=vol.ijk_to_ras_matrix())
    cases = [
        (dict(rtype="prompt", frame="ijk", points=[[500.0, 10.0, 3.0]]), 2, "outside the volume"),
        (dict(rtype="prompt", frame="ijk", box=[[10.0, 10.0, 3.0], [10.5, 40.0, 3.0]]), 2, "empty"),
        (dict(rtype="load_volume", path="/no/such/ct.nii.gz"), 2, "/no/such/ct.nii.gz"),
        (dict(rtype="load_volume", array={"npy": "/no/such.npy", "shape": [2, 2, 2], "dtype": "<f4"},
              ijk_to_ras=np.eye(4).tolist()), 2, "not found"),
        (dict(rtype="load_volume", array=client.write_array("v", vol.array)), 2, "ijk_to_ras"),
        (dict(rtype="uncertainty", mask=client.write_array("m", np.ones((2, 2, 2), np.uint8))), 2, "shape"),
        (dict(rtype="prefetch", range=[1, 2, 3]), 2, "range"),
        (dict(rtype="frobnicate"), 2, "unknown request type"),
    ]
    for fields, code, words in cases:
        resp = client.wait(client.send(fields.pop("rtype"), **fields), timeout=300)
        assert resp["ok"] is False and resp["exit_code"] == code, (fields, resp)
        assert words in resp["error"] and "\n" not in resp["error"], (fields, resp)


def raw_worker(*args):
    return subprocess.Popen([sys.executable, "-m", "samliverseg", "worker", "--device", "cpu", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_worker_refuses_another_protocol_version_and_speaks_only_after_hello():
    proc = raw_worker()
    proc.stdin.write(b"this is not json\n")
    proc.stdin.write(protocol.encode({"id": 1, "type": "status"}))
    proc.stdin.write(protocol.encode({"id": 2, "type": "prompt", "points": [[0, 0, 0]]}))
    proc.stdin.write(protocol.encode({"id": 3, "type": "hello", "protocol": protocol.PROTOCOL_VERSION + 1}))
    proc.stdin.flush()
    out, err = proc.communicate(timeout=300)
    msgs = [json.loads(line) for line in out.decode().splitlines()]
    assert msgs[0]["id"] is None and msgs[0]["exit_code"] == 2 and "not a JSON line" in msgs[0]["error"]
    assert msgs[1]["id"] == 1 and msgs[1]["ok"] and msgs[1]["result"]["model_loaded"] is False
    assert msgs[2] == {"id": 2, "ok": False, "error": f"the first request must be hello (protocol "
                                                      f"{protocol.PROTOCOL_VERSION})", "exit_code": 2}
    assert msgs[3]["id"] == 3 and msgs[3]["exit_code"] == 2 and "protocol version mismatch" in msgs[3]["error"]
    assert proc.returncode == 2 and len(msgs) == 4


def test_a_client_of_another_version_is_refused_with_a_clear_message():
    c = WorkerClient(device="cpu", protocol_version=protocol.PROTOCOL_VERSION + 1)
    try:
        with pytest.raises(WorkerError) as err:
            c.start()
        assert "protocol version mismatch" in str(err.value) and err.value.exit_code == 2
        with pytest.raises(WorkerError, match="protocol version mismatch"):
            c.send("status")  # never restarted
    finally:
        c.shutdown()


def test_a_broken_checkpoint_is_exit_code_3(tmp_path):
    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(b"not a checkpoint")
    with WorkerClient(device="cpu", checkpoint=str(bad)) as c:
        with pytest.raises(WorkerError) as err:
            c.request("load_volume", array=c.write_array("v", np.zeros((4, 8, 8), np.float32)),
                      ijk_to_ras=np.eye(4).tolist(), timeout=300)
        assert err.value.exit_code == 3 and "\n" not in str(err.value)


def test_worker_help_describes_the_protocol_entry_point():
    out = subprocess.run([sys.executable, "-m", "samliverseg", "worker", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for words in (f"Protocol version {protocol.PROTOCOL_VERSION}", protocol.PROTOCOL_PAGE, "stdin: one JSON request",
                  "stdout: one JSON message", '"type": "hello"', "--session-dir", "--model", "130 cancelled"):
        assert words in text, words


# -- a native 3D model (SAM-Med3D, small random-weight configuration) -------------------------------

def test_a_3d_model_is_served_clicks_in_ras_refine_and_equal_the_in_process_engine(tmp_path):
    import torch

    from samliverseg.api import open_model
    from samliverseg.models.build_sam3d import build_sam_med3d_tiny

    torch.manual_seed(0)
    tiny = build_sam_med3d_tiny()
    for n, p in tiny.named_parameters():  # the zero-initialised tables would hide mistakes
        if "rel_pos" in n or "pos_embed" in n:
            torch.nn.init.normal_(p, std=0.05)
    ck = tmp_path / "tiny.pth"
    torch.save({"model_state_dict": tiny.state_dict()}, ck)
    ph = make_phantom((24, 48, 48), (1.6, 1.6, 3.0), seed=2, n_tumors=1)
    m = ijk_to_ras(rot("z", 25) @ rot("y", 10) @ np.diag([-1.0, 1.0, 1.0]), (-20.0, 14.0, 3.5), (1.6, 1.6, 3.0))
    vol = volume_from_ijk_to_ras(ph.hu, m)
    k, j, i = (float(v) for v in np.argwhere(ph.labels == 1)[len(np.argwhere(ph.labels == 1)) // 2])
    pos, neg = (i, j, k), (i + 4.0, j, k)
    env = dict(os.environ, SAMLIVERSEG_CACHE=str(tmp_path / "cache"))
    ref_engine = open_model("sam_med3d_tiny", str(ck), "cpu")
    ref1 = ref_engine.segment(vol, [pos], [1])
    ref2 = ref_engine.segment(vol, [neg], [0], previous=ref1)
    with WorkerClient(model="sam_med3d_tiny", checkpoint=str(ck), device="cpu", env=env) as c:
        loaded = c.request("load_volume", array=c.write_array("vol", ph.hu), ijk_to_ras=m.tolist(), timeout=600)
        assert loaded["kind"] == "3d" and loaded["model"] == "sam_med3d_tiny" and loaded["window"] is None
        events = []
        r1 = c.wait(c.send("prompt3d", points=ras(vol, [pos])), timeout=600, on_event=events.append)
        assert r1["ok"], r1
        assert events and events[0]["event"] == "progress" and events[0]["stage"] == "prompt3d"
        mask1 = c.read_array(r1["result"]["mask"])
        assert mask1.shape == ph.hu.shape and r1["result"]["clicks_reused"] == 0
        np.testing.assert_array_equal(mask1, ref1.mask)
        # all the clicks so far: the first is reused, the negative one refines the last result
        r2 = c.request("prompt3d", points=ras(vol, [pos, neg]), labels=[1, 0], timeout=600)
        assert r2["clicks_reused"] == 1 and r2["report"]["timings"]["patches_encoded"] == 0
        np.testing.assert_array_equal(c.read_array(r2["mask"]), ref2.mask)
        assert c.request("status")["kind"] == "3d" and c.request("status")["clicks"] == 2
        # the same clicks in IJK: the same result again, nothing decoded
        r3 = c.request("prompt3d", frame="ijk", points=[list(pos), list(neg)], labels=[1, 0], timeout=600)
        assert r3["clicks_reused"] == 2
        np.testing.assert_array_equal(c.read_array(r3["mask"]), ref2.mask)
        # 2D requests are refused in one line; a click outside is a prompt error; the result stays
        for rtype, fields in (("prompt", {"points": ras(vol, [pos])}), ("prefetch", {"range": [0, 3]}),
                              ("uncertainty", {"mask": c.write_array("m", mask1)})):
            resp = c.wait(c.send(rtype, **fields), timeout=300)
            assert resp["exit_code"] == 2 and "3D model: send prompt3d" in resp["error"], resp
        bad = c.wait(c.send("prompt3d", frame="ijk", points=[list(pos), list(neg), [-9.0, 1.0, 1.0]],
                            labels=[1, 0, 1]), timeout=300)
        assert bad["exit_code"] == 2 and "outside the volume" in bad["error"]
        again = c.request("prompt3d", frame="ijk", points=[list(pos), list(neg)], labels=[1, 0], timeout=600)
        assert again["clicks_reused"] == 2
        np.testing.assert_array_equal(c.read_array(again["mask"]), ref2.mask)


def test_corrections_through_the_worker_equal_the_in_process_session(client):
    """``correct``: a propagation, then corrections on other slices (a negative click, a box) sent in
    RAS of an oblique volume, applied by the worker to the result it holds: the in-process
    ``CorrectionSession``'s masks, decoding only the slices each walks. A stale ``base`` (the worker
    holds another result) makes the mask again from all the prompts, as ``propagate``; a refused
    correction (a point outside the volume) changes nothing and the next one still builds on the
    result."""
    from samliverseg.interactive.session3d import CorrectionSession

    ph = make_phantom((20, 96, 96), (2.5, 2.5, 5.0), seed=2, n_tumors=0)
    vol = volume_from_ijk_to_ras(ph.hu, GEOMETRIES["oblique"])
    liver = ph.liver_mask > 0
    ks = np.flatnonzero(liver.any(axis=(1, 2)))
    k = int(ks[len(ks) // 2])
    i0, j0, i1, j1 = bbox_2d(liver[k])
    box = SliceBox((i0 - 3.0, j0 - 3.0, float(k)), (i1 + 3.0, j1 + 3.0, float(k)))
    client.request("load_volume", array=client.write_array("vol", ph.hu), ijk_to_ras=vol.ijk_to_ras_matrix())
    first = client.request("propagate", box=ras(vol, [box.corner_a, box.corner_b]), timeout=600)
    eng = PromptEngine("lite_medsam", device="cpu")
    eng.set_volume(vol)
    session = CorrectionSession(eng, Prompts(box=box))
    np.testing.assert_array_equal(client.read_array(first["mask"]), session.mask)
    assert first["result_id"]

    # a negative click inside the mask, two slices up
    from scipy import ndimage

    kn = k + 2
    d = ndimage.distance_transform_edt(session.mask[kn])
    jn, i_n = np.unravel_index(int(np.argmax(d)), d.shape)
    neg = (float(i_n), float(jn), float(kn))
    corr = session.add_point(neg, positive=False)
    all_fields = dict(box=ras(vol, [box.corner_a, box.corner_b]), points=ras(vol, [neg]), labels=[0])
    r1 = client.request("correct", base=first["result_id"], correction={"point": ras(vol, [neg])[0], "label": 0},
                        **all_fields, timeout=600)
    assert r1["incremental"] is True and r1["result_id"] != first["result_id"]
    assert r1["correction"]["changed_slices"] == corr.changed_slices and corr.changed_slices
    assert r1["correction"]["decoded_slices"] == corr.decoded_slices
    client_mask_r1 = client.read_array(r1["mask"])
    np.testing.assert_array_equal(client_mask_r1, session.mask)

    # a refused correction (outside the volume) is one line, exit 2, and changes nothing
    outside = ras(vol, [[200.0, 10.0, float(k)]])[0]
    bad = client.send("correct", base=r1["result_id"], correction={"point": outside, "label": 1}, **all_fields)
    resp = client.wait(bad, timeout=120)
    assert resp["ok"] is False and resp["exit_code"] == 2 and "\n" not in resp["error"]

    # a box on a slice below the first: it replaces that slice and re-propagates from it
    kb = k - 2
    i0, j0, i1, j1 = bbox_2d(liver[kb])
    box2 = SliceBox((i0 - 2.0, j0 - 2.0, float(kb)), (i1 + 2.0, j1 + 2.0, float(kb)))
    corr2 = session.add_box(box2)
    events = []
    rid = client.send("correct", base=r1["result_id"], boxes=[ras(vol, [box2.corner_a, box2.corner_b])],
                      correction={"box": ras(vol, [box2.corner_a, box2.corner_b])}, **all_fields)
    r2 = client.wait(rid, timeout=600, on_event=events.append)["result"]
    assert r2["incremental"] is True and r2["correction"]["kind"] == "box"
    assert r2["correction"]["decoded_slices"] == corr2.decoded_slices and len(corr2.decoded_slices) > 1
    mask = client.read_array(r2["mask"])
    np.testing.assert_array_equal(mask, session.mask)
    # the box's own slice came first, before the walk (a progressive answer): the final one's slice
    parts = [e for e in events if e.get("event") == "partial"]
    assert len(parts) == 1 and parts[0]["result"]["slice_index"] == kb and parts[0]["result"]["slice_axis"] == "k"
    np.testing.assert_array_equal(client.read_array(parts[0]["result"]["mask"]), mask[kb])

    # undo takes the box back: the mask after the negative click, the prompts without the box
    session.undo()
    ru = client.request("correct", base=r2["result_id"], correction={"undo": True}, **all_fields, timeout=600)
    assert ru["incremental"] is True and ru["correction"]["kind"] == "undo" and ru["result_id"] != r2["result_id"]
    np.testing.assert_array_equal(client.read_array(ru["mask"]), client_mask_r1)
    np.testing.assert_array_equal(session.mask, client_mask_r1)
    session.add_box(box2)
    r2 = client.request("correct", base=ru["result_id"], boxes=[ras(vol, [box2.corner_a, box2.corner_b])],
                        correction={"box": ras(vol, [box2.corner_a, box2.corner_b])}, **all_fields, timeout=600)
    np.testing.assert_array_equal(client.read_array(r2["mask"]), mask)

    # a stale base: the mask is made again from all the prompts
    r3 = client.request("correct", base="not-the-last-result", boxes=[ras(vol, [box2.corner_a, box2.corner_b])],
                        correction={"box": ras(vol, [box2.corner_a, box2.corner_b])}, **all_fields, timeout=600)
    assert r3["incremental"] is False and r3["correction"] is None
    ref = eng.segment(Prompts(box=box, boxes=[box2], negative=[neg]))
    np.testing.assert_array_equal(client.read_array(r3["mask"]), ref.mask)
    for wrong in ({"point": outside, "box": [outside, outside]}, {"label": 1}, {"point": outside, "size": 3},
                  {"undo": False}, {"undo": True, "label": 1}):
        resp = client.wait(client.send("correct", correction=wrong, **all_fields), timeout=120)
        assert resp["ok"] is False and resp["exit_code"] == 2 and "correction must be" in resp["error"]
