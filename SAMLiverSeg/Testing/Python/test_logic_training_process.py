"""The training panel's Qt-free logic: real ``samliverseg prepare`` / ``samliverseg train``
subprocesses on a tiny dataset, stopped, resumed and finished; the plot nodes in a real scene.

The subprocess trains the decoder of a tiny random-weight SAM (``libtest_helpers.build_tiny_sam``,
the library tests' one). A model registered in this test process is invisible to the subprocess,
so the test registers it in the subprocess as Python starts (``libtest_helpers.tiny_sam_env``: a
``sitecustomize`` module on the subprocess's ``PYTHONPATH``); the train command itself is the real
CLI, unchanged.
"""

from __future__ import annotations

import ast
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from slicer_test_helpers import MODULE_DIR, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "SAMLiverSegLib" / "tests"))
import libtest_helpers  # noqa: E402  (the library tests' tiny SAM and phantoms)

from samliverseg.api import open_model
from SAMLiverSegLogic import module_logic, process, training_process as tp

TINY = "tiny_panel_sam"


def trainer_watches_stop_file() -> bool:
    """Whether this samliverseg's trainer watches ``OUTPUT/STOP`` (the run-folder contract the Stop
    button relies on; from the trainfolders work on)."""
    try:
        from samliverseg.training import runfolder
    except ImportError:
        return False
    return getattr(runfolder, "STOP_NAME", None) == tp.STOP_NAME


STOP_WATCHED = trainer_watches_stop_file()
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three small phantoms (image + label NIfTI pairs), the tiny SAM's weights, the subprocess env."""
    root = tmp_path_factory.mktemp("training")
    data = libtest_helpers.write_phantom_pairs(root / "labelled", 3, (12, 48, 48), (4.0, 4.0, 5.0))
    weights = libtest_helpers.save_tiny_sam(root / f"{TINY}.pth", seed=0)
    models = root / "user-models"  # the trained-models folder of this test, not the user's
    env = libtest_helpers.tiny_sam_env(dict(os.environ, SAMLIVERSEG_MODELS=str(models), OMP_NUM_THREADS="1"), TINY)
    return {"root": root, "labelled": data, "weights": weights, "env": env, "models": models}


def tiny_request(dataset, run, **kw):
    d = dict(labelled=str(dataset["labelled"]), run_folder=str(run), kind="decoder", epochs=10, device="cpu",
             base_model=TINY, checkpoint=str(dataset["weights"]), target="liver", val_fraction=0.34,
             model_name="panel-test-model",
             options={"batch_size": 2, "max_slices_per_case": 3, "lr": 1e-3, "box_jitter_px": 2})
    d.update(kw)
    return tp.TrainingRequest(**d)


# -- the request and its config -----------------------------------------------------------------

def test_request_validation_names_what_to_change(tmp_path, dataset):
    from samliverseg.core.errors import InputError

    ok = tiny_request(dataset, tmp_path / "run")
    ok.validate()
    bad = [
        (dict(run_folder=""), "run folder"),
        (dict(labelled=str(tmp_path / "nowhere")), "does not exist"),
        (dict(labelled=""), "labelled"),
        (dict(kind="vnet"), "trainer kind"),
        (dict(target="kidney"), "target"),
        (dict(device="tpu"), "device"),
        (dict(epochs=0), "epochs"),
        (dict(kind="semi"), "unlabelled"),
        (dict(unlabelled=str(tmp_path / "nowhere")), "unlabelled folder"),
        (dict(checkpoint=str(tmp_path / "missing.pth")), "checkpoint"),
        (dict(run_folder=str(dataset["labelled"])), "differ"),
    ]
    for change, words in bad:
        with pytest.raises(InputError, match=words):
            tiny_request(dataset, tmp_path / "run", **change).validate()
    job = tp.TrainingJob(tiny_request(dataset, tmp_path / "run2", epochs=0))
    with pytest.raises(InputError):
        job.start()
    assert job.state.status == "idle" and not (tmp_path / "run2").exists()  # nothing written on bad input
    with pytest.raises(InputError, match="nothing to resume"):
        tp.TrainingJob(tiny_request(dataset, tmp_path / "run3")).resume()


def test_config_is_accepted_by_the_trainer_config_loader(tmp_path, dataset):
    from samliverseg.training.config import load_config

    unl = tmp_path / "unlabelled"
    unl.mkdir()
    req = tiny_request(dataset, tmp_path / "run", kind="semi", unlabelled=str(unl), epochs=3, device="auto")
    path = tp.write_config(req)
    assert path == tmp_path / "run" / "train.yaml"
    assert [p.name for p in path.parent.iterdir()] == ["train.yaml"]  # no temporary file left behind
    raw = yaml.safe_load(path.read_text())
    assert raw["output"] == str((tmp_path / "run").resolve()) and raw["cache"] == str((tmp_path / "run" / "cache").resolve())
    assert raw["model_name"] == "panel-test-model" and raw["batch_size"] == 2
    try:
        cfg = load_config(path)
    except Exception as exc:  # the semi trainer may not be installed yet: the decoder config must load
        assert "not available" in str(exc), exc
        cfg = load_config(tp.write_config(tiny_request(dataset, tmp_path / "run", epochs=3)))
    assert cfg.epochs == 3 and cfg.base_model == TINY and cfg.checkpoint == str(dataset["weights"].resolve())
    prep = req.prepare_args()
    assert prep[:2] == ["prepare", str(dataset["labelled"].resolve())] and prep[prep.index("--unlabelled") + 1] == str(unl.resolve())
    assert "--unlabelled" not in tiny_request(dataset, tmp_path / "r", unlabelled=str(unl)).prepare_args()  # semi only
    assert req.train_args(resume=True)[-1] == "--resume"
    assert req.train_args()[-1] == "--overwrite"  # the panel asked before starting over; the trainer refuses a used folder otherwise
    cmd = process.samliverseg_command(*req.train_args())
    assert cmd[:4] == [sys.executable, "-m", "samliverseg.cli.commands", "train"]


def test_panel_choices_match_the_trainers():
    from samliverseg.models.kinds import KIND_NAMES

    assert tuple(tp.TRAINER_KINDS) == KIND_NAMES
    tree = ast.parse((MODULE_DIR / "SAMLiverSeg.py").read_text())
    lists = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(t, ast.Name) and t.id.startswith("TRAIN")}
    assert tuple(lists["TRAINER_KIND_CHOICES"]) == tp.TRAINER_KINDS
    assert tuple(lists["TRAIN_DEVICE_CHOICES"]) == tp.TRAIN_DEVICES


def test_progress_text_and_duration():
    st = tp.TrainingState(status="running", phase="training", epoch=1, epochs=4, step=6, total_steps=12, eta_s=75.4,
                          losses=[(6, 0.51234)], val_dice=[(0, 3, 0.8)])
    assert st.fraction() == 0.5
    text = st.progress_text()
    assert "epoch 2/4" in text and "step 6/12" in text and "ETA 1 min 15 s" in text and "0.5123" in text
    assert tp.format_duration(3725) == "1 h 02 min" and tp.format_duration(None) == ""
    assert tp.TrainingState(status="running", phase="prepare").fraction() is None


# -- real subprocesses --------------------------------------------------------------------------

def test_background_process_keeps_stderr_apart(tmp_path):
    """With separate_stderr, stderr lines are logs even when they look like JSON; stdout JSON is parsed."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent("""
        import json, sys
        for n in range(3):
            print(json.dumps({"event": "step", "step": n + 1}), flush=True)
            print('{"event": "done"}' if n == 1 else f"log line {n}", file=sys.stderr, flush=True)
        sys.exit(130)
    """))
    proc = process.BackgroundProcess([sys.executable, str(child)], separate_stderr=True).start()
    assert proc.wait(timeout=60) == 130 and proc.exit_code == 130
    events = proc.poll()  # wait() polled already: nothing new
    assert events == []
    steps = [line for line in proc.lines if line.startswith('{"event": "step"')]
    assert len(steps) == 3 and sorted(proc.lines) == sorted(steps + ["log line 0", '{"event": "done"}', "log line 2"])
    again = process.BackgroundProcess([sys.executable, str(child)], separate_stderr=True).start()
    seen = []
    while not again.finished():
        seen += again.poll()
        time.sleep(0.01)
    assert [e["step"] for e in seen if e["event"] == "step"] == [1, 2, 3]
    logs = [e for e in seen if e["event"] == "log"]
    assert sorted(e["text"] for e in logs) == sorted(["log line 0", '{"event": "done"}', "log line 2"])
    assert all(e["stream"] == "stderr" for e in logs) and not any(e["event"] == "done" for e in seen)
    assert seen[-1] == {"event": "finished", "returncode": 130}


def test_prepare_failure_is_an_error_with_the_message(tmp_path, dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    job = tp.TrainingJob(tiny_request(dataset, tmp_path / "run", labelled=str(empty)), env=dataset["env"])
    job.start()
    assert job.wait(timeout=120) == "error"
    assert job.state.exit_code == 2 and job.state.message.startswith("prepare failed: error:")
    assert not (tmp_path / "run" / "last.pt").exists()
    assert "Traceback" not in "\n".join(job.log)


def all_gone(pids, timeout=10.0):
    """True once every pid has exited (a SIGKILLed process takes a moment to go)."""
    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    t0 = time.monotonic()
    while any(alive(pid) for pid in pids):
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.02)
    return True


def wait_for(job, condition, timeout=120.0):
    t0 = time.monotonic()
    while not condition():
        job.poll()
        assert job.running(), f"the run ended early: {job.state.status}: {job.state.message}\n" + "\n".join(job.log)
        assert time.monotonic() - t0 < timeout, "timed out\n" + "\n".join(job.log)
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.skipif(not STOP_WATCHED, reason="this samliverseg's trainer does not watch OUTPUT/STOP yet")
def test_train_stop_resume_done_and_register(tmp_path, dataset, monkeypatch):
    """prepare -> train (progress read) -> stop (RUN/STOP: exit 130, last.pt) -> resume -> done ->
    the model is registered once and usable by name in a prompt engine (what the effect builds)."""
    import torch
    from samliverseg.models import user_models
    from samliverseg.models.build_sam import register_model, unregister_model
    from samliverseg.demo.phantom import make_phantom
    from samliverseg.core.prompts import Prompts, SliceBox

    monkeypatch.setenv("SAMLIVERSEG_MODELS", str(dataset["models"]))  # Slicer and its subprocesses share it

    run = tmp_path / "run"
    job = tp.TrainingJob(tiny_request(dataset, run), env=dataset["env"])
    t0 = time.monotonic()
    job.start()
    assert job.state.status == "running" and job.state.phase == "prepare"
    assert (run / "train.yaml").is_file()
    wait_for(job, lambda: job.state.step >= 3)
    st = job.state
    assert st.phase == "training" and st.total_steps == 10 * 3  # 6 train slices, batch 2 -> 3 steps/epoch
    assert st.losses and all(np.isfinite(v) for _, v in st.losses)
    assert st.eta_s is not None and 0.0 < st.fraction() < 1.0
    assert any("prepared 3 case(s)" in line for line in job.log)  # prepare's summary reached the log
    job.stop(grace_s=60)
    assert job.state.phase == "stopping"
    assert job.wait(timeout=60) == "cancelled"
    t_stop = time.monotonic() - t0
    st = job.state
    assert st.exit_code == 130 and not job.killed
    assert Path(st.checkpoint) == run / "last.pt" and (run / "last.pt").is_file()
    assert "Resume" in st.message and not (run / "model.pth").exists()
    assert any("stop requested" in line for line in job.log) and not (run / "STOP").exists()
    assert all(not line.startswith("{") for line in job.log)  # JSON progress is not log text
    stopped_at = st.step
    assert 3 <= stopped_at < st.total_steps
    saved = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert int(saved["step"]) == stopped_at  # the state of the very step the trainer stopped after
    assert job.can_resume()

    job.resume()
    assert job.wait(timeout=240) == "done", job.state.message + "\n" + "\n".join(job.log)
    t_total = time.monotonic() - t0
    st = job.state
    assert st.exit_code == 0 and st.resumed and st.fraction() == 1.0
    assert Path(st.model_path) == run / "model.pth" and (run / "model.pth").is_file()
    model = torch.load(run / "model.pth", map_location="cpu", weights_only=True)
    assert model["metadata"]["target"] == "liver" and model["metadata"]["base_model"] == TINY
    steps = [s for s, _ in st.losses]
    assert steps == list(range(1, st.total_steps + 1))  # one loss per step, before and after the resume
    assert [e for e, _, _ in st.epoch_losses] == list(range(10))
    assert [e for e, _, _ in st.val_dice] == list(range(10))
    assert all(0.0 <= d <= 1.0 for _, _, d in st.val_dice) and st.best_dice == max(d for _, _, d in st.val_dice)
    # `samliverseg train` registered it; the job found that entry and did not register it again
    assert st.registered_name == "panel-test-model", st.message
    entries = user_models.list_user_models()
    assert [(m.name, m.kind, m.source) for m in entries] == [("panel-test-model", "decoder", str(run / "model.pth"))]
    assert "panel-test-model" in module_logic.model_choices()
    register_model(libtest_helpers.tiny_sam_spec(TINY), replace=True)
    try:  # the engine the Segment Anything effect opens for the selected model name
        engine = open_model("panel-test-model", None, "cpu", None)
        ph = make_phantom((12, 48, 48), (4.0, 4.0, 5.0), seed=5, n_tumors=0)
        engine.set_volume(ph.to_volume())
        k = 6
        jj, ii = np.nonzero(ph.liver_mask[k])
        result = engine.segment_slice(Prompts(box=SliceBox.axial(int(ii.min()), int(jj.min()), int(ii.max()),
                                                                 int(jj.max()), k)))
        assert result.mask.shape == (48, 48) and result.mask.dtype == bool
    finally:
        unregister_model(TINY)
    print(f"\ntraining panel run: stop after {t_stop:.1f} s, done after {t_total:.1f} s "
          f"({st.total_steps} steps, stopped at step {stopped_at})")


def test_stop_before_training_began(tmp_path, dataset):
    """Stopped while the trainer loads: cancelled, nothing saved, Start (not Resume) is offered."""
    run = tmp_path / "run"
    job = tp.TrainingJob(tiny_request(dataset, run), env=dataset["env"])
    job.start()
    wait_for(job, lambda: job.stage == "train")
    job.stop(grace_s=30 if STOP_WATCHED else 0.1)  # without RUN/STOP watched, only the kill stops it
    assert job.wait(timeout=60) == "cancelled"
    assert job.state.exit_code != 0 and "press Start" in job.state.message, job.state.message
    assert not (run / "last.pt").exists() and not job.can_resume() and job.state.losses == []


def test_stop_kills_the_tree_when_the_trainer_does_not_stop(tmp_path, dataset):
    """A trainer that neither watches RUN/STOP nor heeds SIGTERM is killed with its children after
    the grace period; the STOP it never read is removed (it would stop the next run at once)."""
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(textwrap.dedent("""
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(json.dumps({"event": "start", "epoch": 0, "step": 0, "total_steps": 10, "eta_s": None,
                          "epochs": 2, "child": child.pid}), flush=True)
        time.sleep(60)
    """))

    def launcher(args, env=None, cwd=None, separate_stderr=False):  # a real, stuck trainer process
        return process._default_launcher([sys.executable, str(stubborn)], env=env, cwd=cwd,
                                         separate_stderr=separate_stderr)

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")  # an earlier run's checkpoint
    (run / "cache").mkdir()
    (run / "cache" / "manifest.json").write_text("{}")
    job = tp.TrainingJob(tiny_request(dataset, run), launcher=launcher)
    job.resume()
    wait_for(job, lambda: job.state.phase == "training", timeout=30)
    child = job.process.pid
    grandchild = next(int(line.split('"child": ')[1].rstrip("}")) for line in job.process.lines if '"child"' in line)
    job.stop(grace_s=0.5)
    assert job.running() and not job.killed  # never blocks the GUI: the kill is left to a later poll()
    assert (run / "STOP").is_file()
    assert job.wait(timeout=30) == "cancelled" and job.killed
    assert not (run / "STOP").exists()
    assert "killed" in job.state.message and "Resume" in job.state.message
    assert all_gone([child, grandchild])


LAUNCHER = """
import signal, subprocess, sys
# like PythonSlicer (a CTK launcher): SIGTERM ends it or is lost, it is never forwarded to the child
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(subprocess.call(sys.argv[1:]))
"""


@pytest.mark.slow
def test_stop_reaches_a_real_trainer_behind_a_launcher(tmp_path, dataset):
    """A real ``samliverseg train`` started through a launcher-like parent that ignores SIGTERM
    and forwards nothing: Stop reaches the trainer through RUN/STOP (it saves last.pt, exits 130);
    with a trainer that does not watch RUN/STOP, the kill after the grace period ends the whole
    tree (launcher and trainer). Either way poll() never waits."""
    launcher_py = tmp_path / "launcher.py"
    launcher_py.write_text(LAUNCHER)

    def launcher(args, env=None, cwd=None, separate_stderr=False):
        return process._default_launcher([sys.executable, str(launcher_py), *args], env=env, cwd=cwd,
                                         separate_stderr=separate_stderr)

    run = tmp_path / "run"
    (run).mkdir()
    (run / "STOP").write_text("left by an earlier, killed run")
    job = tp.TrainingJob(tiny_request(dataset, run), env=dataset["env"], launcher=launcher)
    job.start()
    wait_for(job, lambda: job.state.step >= 2, timeout=240)  # the stale STOP did not stop this run
    tree = [job.process.pid] + [p.pid for p in psutil.Process(job.process.pid).children(recursive=True)]
    assert len(tree) >= 2  # the launcher and the trainer under it
    t0 = time.perf_counter()
    job.stop(grace_s=120 if STOP_WATCHED else 2)
    stop_s = time.perf_counter() - t0
    assert job.running()  # stop() asked and returned: it did not wait for the run to end
    assert (run / "STOP").is_file() and job.state.phase == "stopping"
    durations = []
    while job.running():
        t = time.perf_counter()
        job.poll()
        durations.append(time.perf_counter() - t)
        assert time.perf_counter() - t0 < 180, "\n".join(job.log)
        time.sleep(0.02)
    st = job.state
    assert st.status == "cancelled", st.message
    assert not (run / "STOP").exists()
    assert all_gone(tree)
    if STOP_WATCHED:
        assert not job.killed and st.exit_code == 130 and (run / "last.pt").is_file(), "\n".join(job.log)
        assert "state saved" in st.message and job.can_resume()
    else:
        assert job.killed and "killed" in st.message
    durations.sort()
    print(f"\nstop() {1e3 * stop_s:.2f} ms; poll() over {len(durations)} calls: median "
          f"{1e3 * durations[len(durations) // 2]:.2f} ms, max {1e3 * durations[-1]:.2f} ms "
          f"(trainer watches STOP: {STOP_WATCHED}; noisy shared machine)")


# -- the plot nodes -----------------------------------------------------------------------------

def column(table_node, name):
    arr = table_node.GetTable().GetColumnByName(name)
    return [arr.GetValue(i) for i in range(arr.GetNumberOfTuples())]


def test_training_plot_nodes_in_a_real_scene(scene):
    st = tp.TrainingState(losses=[(1, 0.9), (2, 0.7), (3, 0.6)], epoch_losses=[(0, 3, 0.73)], val_dice=[])
    nodes = module_logic.update_training_plot(scene, st)
    assert nodes.chart.GetNumberOfPlotSeriesNodes() == 3
    assert nodes.view.GetPlotChartNodeID() == nodes.chart.GetID()
    assert column(nodes.steps_table, "step") == [1, 2, 3] and column(nodes.steps_table, "train loss") == [0.9, 0.7, 0.6]
    assert column(nodes.epochs_table, "epoch") == [1] and np.isnan(column(nodes.epochs_table, "val Dice")[0])
    for name, series in nodes.series.items():
        table = nodes.steps_table if name == "train loss (step)" else nodes.epochs_table
        assert series.GetTableNode() is table and series.GetXColumnName() == "step"
        assert table.GetTable().GetColumnByName(series.GetYColumnName()) is not None
    n_before = scene.GetNumberOfNodes()
    st.losses.append((4, 0.5))
    st.val_dice.append((0, 3, 0.81))
    st.epoch_losses.append((1, 6, 0.55))
    st.val_dice.append((1, 6, 0.86))
    same = module_logic.update_training_plot(scene, st, nodes)
    assert same is nodes and scene.GetNumberOfNodes() == n_before  # updated in place
    assert column(nodes.steps_table, "step") == [1, 2, 3, 4]
    assert column(nodes.epochs_table, "step") == [3, 6] and column(nodes.epochs_table, "val Dice") == [0.81, 0.86]
    assert nodes.steps_table.GetTable().GetNumberOfRows() == 4
    scene.Clear(0)  # a closed scene: the nodes are made again
    again = module_logic.update_training_plot(scene, st, nodes)
    assert again is not nodes and again.alive_in(scene) and column(again.steps_table, "step") == [1, 2, 3, 4]


def test_model_choices_and_engines_without_trained_models(tmp_path, monkeypatch):
    from samliverseg.core.errors import InputError
    from SAMLiverSegLogic.constants import MODEL_CHOICES

    monkeypatch.setenv("SAMLIVERSEG_MODELS", str(tmp_path / "none"))
    assert module_logic.model_choices() == MODEL_CHOICES
    with pytest.raises(InputError, match="unknown model"):
        open_model("no-such-model", None, "cpu", None)
