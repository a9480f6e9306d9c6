"""The Qt-free worker client against a real ``samliverseg worker`` (real LiteMedSAM), with volume
nodes and slice views of a real MRML scene (slicer-core).

What the effect will rely on: the client imports no torch and no model code; a drag in a slice
view, sent in RAS, gives the worker the mask the in-process click path gives; ``poll()`` returns at
once and the pipe ``fileno()`` wakes a notifier; ``cancel`` and request timeouts answer; a worker
that cannot start says why in one line; ``shutdown`` kills a worker that does not stop in time.
"""

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import vtk
from slicer_test_helpers import GEOMETRIES, MODULE_DIR, add_ct, centre_view_on, roi_in_volume_axes, slice_node_for

from samliverseg.interactive.engine import PromptEngine
from SAMLiverSegLogic import geometry, markups_prompts, slice_clicks, volume_nodes
from SAMLiverSegLogic.worker_client import (WorkerClient, WorkerError, check_hello, current_shared_client,
                                            describe_exit, prompt_fields, shared_client, shutdown_shared_client,
                                            volume_node_key)

SHAPE = (24, 40, 48)  # k, j, i


def test_the_client_imports_neither_torch_nor_model_code():
    code = ("import sys; import SAMLiverSegLogic.worker_client; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(("
            "'samliverseg.interactive', 'samliverseg.models', 'samliverseg.modeling', 'samliverseg.service.server'))]; "
            "print(bad)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_hello_of_another_version_and_exit_descriptions():
    check_hello({"protocol": 1, "version": "0.1.0"}, expected=1)
    with pytest.raises(WorkerError) as err:
        check_hello({"protocol": 0, "version": "0.0.9"}, expected=1)
    assert err.value.exit_code == 2 and "speaks protocol 0 (samliverseg 0.0.9)" in str(err.value)
    assert describe_exit(-signal.SIGKILL) == "the inference worker was killed (SIGKILL, perhaps out of memory)"
    assert describe_exit(-signal.SIGSEGV) == "the inference worker was killed (SIGSEGV)"
    assert describe_exit(1, "ModuleNotFoundError: No module named 'samliverseg'") == \
        "the inference worker exited with code 1: ModuleNotFoundError: No module named 'samliverseg'"


def test_shared_client_is_one_worker_per_settings():
    """The effect, the module panel and the uncertainty overlay share one worker while the settings stay."""
    shutdown_shared_client()
    a = shared_client(device="cpu", backend="torch")
    try:
        assert shared_client(device="cpu", backend="torch", checkpoint=None, python=sys.executable) is a
        assert a.proc is None and a.watch() is None  # made, not started
        assert a.request("status", timeout=300)["model_loaded"] is False
        proc = a.proc
        assert a.watch() == (1, a.fileno()) and a.next_timeout() is None
        assert shared_client(device="cpu", backend="torch") is a and a.pid == proc.pid
        b = shared_client(device="cpu", backend="torch", window="abdomen")  # another setting: another worker
        assert b is not a and current_shared_client() is b and b.proc is None
        assert a.proc is None and proc.poll() is not None and a.session_dir is None
        with pytest.raises(TypeError, match="unknown settings"):
            shared_client(devise="cpu")
        assert current_shared_client() is b
        c = shared_client(device="cpu", backend="torch", window="abdomen", decoder_precision="bf16")
        assert c is not b and b.proc is None
        assert c.command()[c.command().index("--decoder-precision") + 1] == "bf16"
        assert c.request("status", timeout=300)["model_loaded"] is False  # the worker takes the option
        assert shared_client(device="cpu", backend="torch", window="abdomen", decoder_precision="bf16") is c
    finally:
        shutdown_shared_client()
    assert current_shared_client() is None
    shutdown_shared_client()  # twice is fine


@pytest.fixture
def oblique_ct(scene):
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    view = slice_node_for(scene, "Axial", vol)  # rotated to the volume plane, as Slicer shows a volume
    centre_view_on(view, geometry.ijk_to_ras_point(vol, (19, 18, 12)))
    return vol, view


def test_a_drag_in_a_slice_view_gives_the_in_process_mask(client, oblique_ct):
    vol, view = oblique_ct
    rid = client.load_volume_node(vol)
    loaded = client.wait(rid, timeout=600)
    assert loaded["ok"], loaded
    np.testing.assert_allclose(loaded["result"]["ijk_to_ras"], geometry.world_ijk_to_ras(vol), atol=1e-9)
    corners_ijk = [(11, 10, 12), (29, 27, 12)]  # around the bright organ of blob_ct
    xy = [slice_clicks.ras_to_xy(view, geometry.ijk_to_ras_point(vol, c))[:2] for c in corners_ijk]
    # the worker: what the effect will send, the drag's corners in RAS and the view's normal
    res = client.request("prompt", box=[slice_clicks.xy_to_ras(view, p).tolist() for p in xy],
                         normal=slice_clicks.view_normal(view).tolist(), timeout=600)
    mask = client.read_array(res["mask"])
    assert not os.path.exists(res["mask"]["npy"])  # read into memory, its file removed
    # in process: the click path of the effect
    volume = volume_nodes.volume_from_node(vol)
    builder = slice_clicks.PromptBuilder(volume.shape, volume.array)
    a = slice_clicks.map_click(view, vol, xy[0], volume.shape)
    builder.set_box(a, slice_clicks.map_click(view, vol, xy[1], volume.shape, slice_axis=a.slice_axis))
    engine = PromptEngine("lite_medsam", device="cpu")
    engine.set_volume(volume)
    ref = engine.segment_slice(builder.prompts_on_slice())
    assert (res["slice_axis"], res["slice_index"]) == (ref.slice_axis, ref.slice_index) == ("k", 12)
    assert mask.sum() > 20
    np.testing.assert_array_equal(mask, ref.mask)


@pytest.fixture(scope="module")
def in_process_engine():
    from samliverseg.api import open_model

    return open_model("lite_medsam", device="cpu")


def _point_list(scene, vol, ijk_points, name):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    node.SetName(name)
    for ijk in ijk_points:
        node.AddControlPointWorld(vtk.vtkVector3d(*geometry.ijk_to_ras_point(vol, ijk)))
    return node


@pytest.mark.parametrize("name", ["identity", "flipped", "oblique"])
def test_segment_liver_from_markups_is_one_propagate_request_equal_to_open_model(scene, client, in_process_engine,
                                                                                 name):
    """The module panel's "Segment liver/tumor": an ROI and point lists, sent as one request."""
    vol = add_ct(scene, GEOMETRIES[name], SHAPE)
    roi = roi_in_volume_axes(scene, vol, (9, 8, 10), (30, 28, 13))  # around the bright organ, 4 slices
    pos = _point_list(scene, vol, [(19.0, 18.0, 11.0), (18.0, 17.0, 12.0)], "liver")
    neg = _point_list(scene, vol, [(28.0, 26.0, 11.0)], "exclude")
    prompts = markups_prompts.prompts_from_markups(vol, roi_node=roi, positive_node=pos, negative_node=neg)
    assert prompts.roi is not None and len(prompts.positive) == 2 and len(prompts.negative) == 1
    client.load_volume_node(vol)
    events = []
    resp = client.wait(client.send("propagate", **prompt_fields(prompts)), timeout=600, on_event=events.append)
    assert resp["ok"], resp
    mask = client.read_array(resp["result"]["mask"])
    in_process_engine.set_volume(volume_nodes.volume_from_node(vol))
    ref = in_process_engine.segment(prompts, propagate=True)
    assert mask.sum() > 50 and set(np.flatnonzero(mask.any(axis=(1, 2)))) <= set(range(10, 14))
    np.testing.assert_array_equal(mask, ref.mask)
    assert resp["result"]["report"]["voxels"] == ref.report["voxels"]
    assert [e["stage"] for e in events] and events[-1]["done"] == events[-1]["total"]
    if name == "oblique":  # the panel's propagate box unchecked: the prompted slices only
        flat = client.request("propagate", propagate=False, timeout=600, **prompt_fields(prompts))
        ref_flat = in_process_engine.segment(prompts, propagate=False)
        np.testing.assert_array_equal(client.read_array(flat["mask"]), ref_flat.mask)


def test_poll_returns_at_once_the_pipe_wakes_a_notifier_and_cancel_answers(client, oblique_ct):
    vol, _ = oblique_ct
    client.wait(client.load_volume_node(vol), timeout=600)
    rid = client.send("prefetch", range=[0, SHAPE[0] - 1], around=12)
    first = client.poll()  # the worker is busy embedding: nothing final for it yet, and poll did not wait
    assert not [m for m in first if m.get("id") == rid and "ok" in m] and rid in client.pending()
    got = []
    while not got:  # what a QSocketNotifier on fileno() does: wake when the pipe is readable
        readable, _, _ = select.select([client.fileno()], [], [], 120)
        assert readable, "the worker sent nothing for 120 s"
        got += [m for m in client.poll() if m.get("id") == rid]
    assert got[0]["event"] == "progress" and got[0]["total"] == SHAPE[0]
    client.cancel(rid)
    resp = client.wait(rid, timeout=600)
    assert resp["ok"] is False and resp["exit_code"] == 130 and "prefetch cancelled" in resp["error"]


def test_the_socket_transport_for_windows_serves_the_same(client, oblique_ct):
    """The transport Windows uses (select() works on sockets there, not on pipes), run here: the
    worker connects back to 127.0.0.1 with a token; same masks, progress, cancel, restart."""
    import socket

    vol, view = oblique_ct
    box = [geometry.ijk_to_ras_point(vol, c).tolist() for c in [(11, 10, 12), (29, 27, 12)]]
    client.wait(client.load_volume_node(vol), timeout=600)
    ref = client.read_array(client.request("prompt", box=box, normal=slice_clicks.view_normal(view).tolist(),
                                           timeout=600)["mask"])
    with WorkerClient(device="cpu", backend="torch", transport="socket") as c:
        c.load_volume_node(vol)
        listening = c.watch()
        port = c.listening_port()
        intruder = socket.create_connection(("127.0.0.1", port))  # not the worker: refused, listening goes on
        intruder.sendall(b"guess\n")
        rid = c.send("prompt", box=box, normal=slice_clicks.view_normal(view).tolist())
        final = []
        while not final:  # a notifier on fileno(), remade when watch() changes
            assert select.select([c.fileno()], [], [], 120)[0], "nothing for 120 s"
            final = [m for m in c.poll() if m.get("id") == rid and "ok" in m]
        assert final[0]["ok"], final
        assert c.watch() != listening and c.watch()[0] == listening[0] == 1  # the connection, not the listener
        intruder.close()
        np.testing.assert_array_equal(c.read_array(final[0]["result"]["mask"]), ref)
        rid = c.send("prefetch", range=[0, SHAPE[0] - 1])
        events = []
        while not events:
            select.select([c.fileno()], [], [], 120)
            events = [m for m in c.poll() if m.get("id") == rid]
        assert events[0]["event"] == "progress"
        c.cancel(rid)
        assert c.wait(rid, timeout=600)["exit_code"] == 130
        pid = c.request("status", timeout=60)["pid"]
        rid = c.send("prefetch", range=[0, SHAPE[0] - 1])
        os.kill(pid, signal.SIGKILL)
        lost = c.wait(rid, timeout=120)
        assert lost["exit_code"] == 70 and "killed (SIGKILL" in lost["error"]
        again = c.request("prompt", box=box, normal=slice_clicks.view_normal(view).tolist(), timeout=600)
        assert c.starts == 2
        np.testing.assert_array_equal(c.read_array(again["mask"]), ref)
        proc = c.proc
    assert proc.poll() is not None


def test_channels_route_each_owners_messages_and_the_client_knows_the_volume(scene, client, oblique_ct, caplog):
    """Several users of the shared worker (issue 11): whoever reads the pipe, each owner's poll
    returns its own messages only; the others' wait in their inboxes and their ``notify`` is
    called; an owner that closed its channel gets nothing (its answer is dropped with a log line);
    the client knows which volume the worker holds and sends one only when it holds another (the
    same grid with other voxels counts as another) or the voxels changed."""
    import logging

    vol, _ = oblique_ct
    same_grid = add_ct(scene, GEOMETRIES["oblique"], SHAPE, name="same grid", seed=1)
    caplog.set_level(logging.INFO, logger="SAMLiverSegLogic.worker_client")
    woken = []
    a = client.channel("a", notify=lambda: woken.append("a"))
    b = client.channel("b", notify=lambda: woken.append("b"))
    gone = client.channel("gone")
    la, sent = a.ensure_volume_node(vol)
    assert sent and client.volume_key == volume_node_key(vol)
    assert a.ensure_volume_node(vol) == (None, False)  # the requests sent next run after that load
    ra = a.send("status")
    lb, sent = b.ensure_volume_node(same_grid)
    assert sent and client.volume_key == volume_node_key(same_grid) != volume_node_key(vol)
    rb = b.send("status")
    rg = gone.send("prefetch", range=[0, 2])
    gone.close()  # cancelled; its answer is dropped
    with pytest.raises(ValueError, match="closed"):
        gone.send("status")
    assert set(a.pending()) == {la, ra} and set(b.pending()) == {lb, rb}
    got_a = []
    while client.pending():  # only a's notifier fires: a's polls read everything
        if not select.select([client.fileno()], [], [], 120)[0]:
            raise AssertionError(f"nothing for 120 s; pending {client.pending()}")
        got_a += a.poll()
    assert {m["id"] for m in got_a} <= {la, ra}
    assert {m["id"] for m in got_a if "ok" in m} == {la, ra} and all(m["ok"] for m in got_a if "ok" in m), got_a
    assert "b" in woken and "a" not in woken and b.ready() and not a.ready()
    got_b = b.poll()
    assert {m["id"] for m in got_b} == {lb, rb} and all(m["ok"] for m in got_b if "ok" in m)
    assert not b.ready() and client.poll() == []  # nothing for the plain API's owner either
    assert any(f"request {rg}" in r.getMessage() and "'gone' is gone" in r.getMessage() for r in caplog.records)
    # the worker holds same_grid: vol is sent again; then changed voxels (a new MTime) are sent again
    la2, sent = a.ensure_volume_node(vol)
    assert sent and a.ensure_volume_node(vol) == (None, False)
    vol.GetImageData().Modified()
    la3, sent = a.ensure_volume_node(vol)
    assert sent and client.volume_key == volume_node_key(vol)
    finals = []
    while len(finals) < 2:
        select.select([client.fileno()], [], [], 120)
        finals += [m for m in a.poll() if "ok" in m]
    assert sorted(m["id"] for m in finals) == [la2, la3] and all(m["ok"] for m in finals)
    a.close()
    b.close()


def test_a_request_timeout_answers_and_cancels_it(client, oblique_ct):
    vol, _ = oblique_ct
    client.wait(client.load_volume_node(vol), timeout=600)
    rid = client.send("prefetch", range=[0, SHAPE[0] - 1], timeout=0.05)
    assert 0.0 <= client.next_timeout() <= 0.05  # when a GUI polls anyway (no notifier wakes for silence)
    final = []
    while not final:
        select.select([client.fileno()], [], [], 0.1)
        final = [m for m in client.poll() if m.get("id") == rid and "ok" in m]
    assert final[0]["ok"] is False and final[0]["exit_code"] == 70
    assert final[0]["error"] == f"request {rid} (prefetch) got no answer within 0.05 s and was cancelled"
    for _ in range(600):  # the worker stops it after the slice it is on
        if not client.request("status", timeout=600)["prefetch"]:
            break
        select.select([], [], [], 0.2)
    else:
        raise AssertionError("the timed-out prefetch was not cancelled in the worker")
    assert not [m for m in client.poll() if m.get("id") == rid]  # its late answer is dropped


def test_a_worker_that_cannot_start_says_why(tmp_path):
    python = "/usr/bin/python3"
    if not os.path.exists(python) or subprocess.run([python, "-c", "import samliverseg"],
                                                    capture_output=True, env={}).returncode == 0:
        pytest.skip("needs a Python without samliverseg")
    c = WorkerClient(python=python, env={"PATH": os.environ.get("PATH", "")})
    try:
        with pytest.raises(WorkerError) as err:
            c.start(timeout=120)
        assert "exited with code 1" in str(err.value) and "No module named samliverseg" in str(err.value)
    finally:
        c.shutdown()
    with WorkerClient(python="/no/such/python") as c:
        with pytest.raises(WorkerError, match="cannot start the inference worker with /no/such/python"):
            c.start()


def test_shutdown_kills_a_worker_that_does_not_stop_in_time(client, oblique_ct):
    """Last in the file: it ends the module's worker."""
    vol, _ = oblique_ct
    client.wait(client.load_volume_node(vol), timeout=600)
    rid = client.send("prefetch", range=[0, SHAPE[0] - 1])
    got = []
    while not got:  # embedding the second slice now
        select.select([client.fileno()], [], [], 1.0)
        got = [m for m in client.poll() if m.get("id") == rid]
    assert got[0]["event"] == "progress", got
    proc, session = client.proc, client.session_dir
    client.shutdown_timeout = 0.05  # less than one embedding: the worker cannot finish its slice in time
    client.shutdown()
    assert client.killed_pids == [proc.pid]
    assert proc.poll() is not None and not psutil.pid_exists(proc.pid)
    assert not Path(session).exists() and client.proc is None
