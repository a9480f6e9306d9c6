"""The Qt-free subprocess manager and the batch queue, with real subprocesses."""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from SAMLiverSegLogic import batch, process


def script(tmp_path, body, name="child.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def poll_until_done(proc, timeout=30.0):
    events = []
    t0 = time.monotonic()
    while not proc.finished():
        events += proc.poll()
        if time.monotonic() - t0 > timeout:
            raise AssertionError("the process did not finish")
        time.sleep(0.02)
    return events


def test_reads_json_lines_and_exit_code(tmp_path):
    child = script(tmp_path, """
        import json, sys, time
        for n in range(5):
            print(json.dumps({"event": "progress", "done": n + 1, "total": 5}), flush=True)
            time.sleep(0.02)
        print("a plain log line with ünïcode", flush=True)
        print("{not json", flush=True)
        sys.exit(3)
    """)
    proc = process.BackgroundProcess([sys.executable, str(child)]).start()
    assert proc.is_running() or proc.poll() is not None
    events = poll_until_done(proc)
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["done"] for e in progress] == [1, 2, 3, 4, 5]
    logs = [e["text"] for e in events if e["event"] == "log"]
    assert logs == ["a plain log line with ünïcode", "{not json"]
    assert events[-1] == {"event": "finished", "returncode": 3}
    assert proc.returncode == 3 and not proc.cancelled


def test_poll_never_blocks(tmp_path):
    child = script(tmp_path, """
        import time
        time.sleep(60)
        print("late", flush=True)
    """)
    proc = process.BackgroundProcess([sys.executable, str(child)]).start()
    assert proc.poll() == [] and not proc.finished()  # it did not wait for the child's output or end
    proc.cancel()


def test_cancel_kills_the_whole_tree(tmp_path):
    grandchild = script(tmp_path, """
        import time
        time.sleep(60)
    """, "grandchild.py")
    child = script(tmp_path, f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn parent: needs the kill
        p = subprocess.Popen([sys.executable, {str(grandchild)!r}])
        print('{{"event": "started", "pid": %d}}' % p.pid, flush=True)
        time.sleep(60)
    """)
    proc = process.BackgroundProcess([sys.executable, str(child)], kill_timeout=1.0).start()
    grandchild_pid = None
    t0 = time.monotonic()
    while grandchild_pid is None and time.monotonic() - t0 < 20:
        for e in proc.poll():
            if e.get("event") == "started":
                grandchild_pid = e["pid"]
        time.sleep(0.02)
    assert grandchild_pid and psutil.pid_exists(grandchild_pid)
    child_pid = proc.pid
    killed = proc.cancel()
    assert child_pid in killed  # ignored SIGTERM, so it was killed after the timeout
    assert proc.returncode == process.CANCELLED and proc.cancelled
    for pid in (child_pid, grandchild_pid):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert proc.cancel() == []  # idempotent


def test_samliverseg_command_uses_this_interpreter():
    cmd = process.samliverseg_command("models")
    assert cmd[:3] == [sys.executable, "-m", "samliverseg.cli.commands"] and cmd[3] == "models"


def test_samliverseg_cli_runs_as_a_subprocess(tmp_path):
    """The real CLI through the manager: a bad input gives a one-line error and exit code 2."""
    bad = tmp_path / "not_a_ct.nii.gz"
    bad.write_bytes(b"this is not an image")
    proc = process.BackgroundProcess(process.samliverseg_command(
        "segment", str(bad), "-o", str(tmp_path / "out.nii.gz"), "--box-ijk", "1", "1", "5", "5", "1")).start()
    events = poll_until_done(proc, timeout=120)
    assert proc.returncode == 2
    errors = [e["text"] for e in events if e["event"] == "log" and e["text"].startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(proc.lines)
    assert not (tmp_path / "out.nii.gz").exists()


# -- batch -----------------------------------------------------------------------------------------

def write_ct(path, shape=(10, 12, 14)):
    sitk.WriteImage(sitk.GetImageFromArray(np.full(shape, -1000, np.int16)), str(path))


def test_plan_batch(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_ct(inp / "case1.nii.gz")
    write_ct(inp / "case2.nrrd")
    write_ct(inp / "case3.mha")
    (inp / "case1.mrk.json").write_text("{}")
    (inp / "notes.txt").write_text("x")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(inp / "old.seg.nrrd"))
    dicom = inp / "case4"
    dicom.mkdir()
    (dicom / "1.dcm").write_bytes(b"")
    jobs = batch.plan_batch(inp, tmp_path / "out", default_prompts=None)
    assert [j.case for j in jobs] == ["case1", "case2", "case3", "case4"]
    assert jobs[0].prompts == inp / "case1.mrk.json" and jobs[0].status == "pending"
    assert all(j.status == "skipped" and "case" in j.message for j in jobs[1:])
    assert jobs[0].output == tmp_path / "out" / "case1.seg.nrrd"
    cmd = jobs[0].command("lite_medsam", "cpu", "liver", None, "tumor")
    assert cmd[:4] == [sys.executable, "-m", "samliverseg.cli.commands", "segment"]
    assert cmd[cmd.index("--label") + 1] == "2" and cmd[cmd.index("--segment-name") + 1] == "Liver tumor"
    assert cmd[cmd.index("--window") + 1] == "liver"
    everything = batch.plan_batch(inp, tmp_path / "out", default_prompts=inp / "case1.mrk.json", output_format="nii.gz")
    assert all(j.status == "pending" for j in everything)
    with pytest.raises(ValueError, match="differ"):
        batch.plan_batch(inp, inp)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no CT files"):
        batch.plan_batch(empty, tmp_path / "out")


def test_batch_runner_runs_jobs_in_turn_and_reports_failures(tmp_path):
    """Real CLI subprocesses: each case fails fast on a bad prompt file; the queue goes on."""
    inp = tmp_path / "in"
    inp.mkdir()
    for c in ("a", "b"):
        write_ct(inp / f"{c}.nii.gz")
        (inp / f"{c}.mrk.json").write_text('{"markups": []}')
    runner = batch.BatchRunner(batch.plan_batch(inp, tmp_path / "out"), device="cpu")
    t0 = time.monotonic()
    seen = []
    while not runner.done():
        seen += runner.poll()
        assert time.monotonic() - t0 < 180
        time.sleep(0.05)
    assert runner.progress() == (2, 2)
    assert [j.status for j in runner.jobs] == ["failed", "failed"]
    assert all(j.message.startswith("error:") for j in runner.jobs)
    assert any("[a] started" in s for s in seen) and any("[b] failed" in s for s in seen)


def test_batch_runner_cancel(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for c in ("a", "b", "c"):
        write_ct(inp / f"{c}.nii.gz")
    slow = script(tmp_path, """
        import time
        print("working", flush=True)
        time.sleep(60)
    """, "slow.py")

    def launcher(args, env=None, cwd=None):  # a real process standing in for a long segmentation
        return process._default_launcher([sys.executable, str(slow)], env=env, cwd=cwd)

    runner = batch.BatchRunner(batch.plan_batch(inp, tmp_path / "out", default_prompts=inp / "x.mrk.json"),
                               launcher=launcher)
    runner.poll()
    pid = runner.process.pid
    assert runner.current.case == "a"
    runner.cancel()
    assert runner.done() and [j.status for j in runner.jobs] == ["cancelled"] * 3
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_reads_without_threads_and_poll_returns_at_once(tmp_path):
    """A chatty child (far more than a pipe buffer, multi-byte characters cut across reads, a
    last line without newline) and a grandchild that keeps the pipe open after the child exits:
    every line arrives, no thread is started, and no poll() waits for anything."""
    import threading

    child = script(tmp_path, """
        import subprocess, sys, time
        out = sys.stdout.buffer
        line = ("é" * 99 + "\\n").encode("utf-8")  # 199 bytes
        for n in range(2000):  # about 400 kB: the pipe fills up unless the parent reads it
            out.write(b"%04d " % n + line[:100])
            out.flush()
            out.write(line[100:])
        gc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # inherits stdout
        out.write(b'{"event": "grandchild", "pid": %d}\\n' % gc.pid)
        out.write("last line, no newline ✓".encode("utf-8"))
        out.flush()
    """)
    before = set(threading.enumerate())
    proc = process.BackgroundProcess([sys.executable, str(child)]).start()
    assert proc.read_fds() == [proc.proc.stdout.fileno()]
    events, durations = [], []
    t0 = time.monotonic()
    while not proc.finished():
        t = time.perf_counter()
        events += proc.poll()
        durations.append(time.perf_counter() - t)
        assert set(threading.enumerate()) == before  # no reader threads
        assert time.monotonic() - t0 < 60, "the child did not finish"
        time.sleep(0.005)
    logs = [e["text"] for e in events if e["event"] == "log"]
    assert len(logs) == 2001 and logs[0] == "0000 " + "é" * 99 and logs[1999] == "1999 " + "é" * 99
    assert logs[-1] == "last line, no newline ✓"
    gc = next(e["pid"] for e in events if e["event"] == "grandchild")
    assert psutil.pid_exists(gc)  # it still holds the pipe: finishing did not wait for its EOF
    psutil.Process(gc).kill()
    assert events[-1] == {"event": "finished", "returncode": 0} and proc.read_fds() == []
    durations.sort()
    print(f"\npoll() over {len(durations)} calls: median {1e3 * durations[len(durations) // 2]:.2f} ms, "
          f"max {1e3 * durations[-1]:.2f} ms (noisy shared machine)")


def test_logic_modules_start_no_threads():
    """The Qt-free process managers never use threads (they barely run in Slicer's process)."""
    import ast

    from slicer_test_helpers import MODULE_DIR

    for name in ("process", "training_process", "batch", "dependencies"):
        tree = ast.parse((MODULE_DIR / "SAMLiverSegLogic" / f"{name}.py").read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"threading", "concurrent", "_thread", "queue"}, name
