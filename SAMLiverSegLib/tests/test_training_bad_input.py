"""Bad input to `samliverseg prepare` / `samliverseg train`, end to end through the CLI.

What test_prepare.py and test_training_decoder.py already cover (function level) is not repeated:
here the command line is run (``samliverseg.cli.commands.main`` in-process, or ``python -m samliverseg``
in a subprocess) and its exit code, messages and files are checked. Also the explicit split of
``prepare`` (``"split"`` in dataset.json, ``--split-file``).

No mocks: real phantom files, a tiny random-weight SAM registered for these tests, real
checkpoints; the full disk is a real 1-page-free tmpfs mounted in a private user+mount namespace
(``unshare -rm``; the test is skipped where that is not allowed). A real CUDA out-of-memory
error cannot be produced on a CPU-only machine; only its classification (``core.errors.is_out_of_memory``) is tested.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from libtest_helpers import SCRIPTS, save_tiny_sam, tiny_sam_command, tiny_sam_fixture
from samliverseg.core.atomic import is_temp_name
from samliverseg.cli.commands import main as cli_main
from samliverseg.demo.phantom import make_phantom
from samliverseg.training import checkpoint as ck
from samliverseg.training.prepare import load_manifest
from samliverseg.training.progress import read_events

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny_badinput_sam"
SHAPE, SPACING = (12, 64, 64), (3.0, 3.0, 5.0)

@pytest.fixture(scope="module", autouse=True)
def user_models_folder(tmp_path_factory):
    """`samliverseg train` registers finished models in $SAMLIVERSEG_MODELS: a temporary one here
    (inherited by the subprocesses), never the user's."""
    old = os.environ.get("SAMLIVERSEG_MODELS")
    os.environ["SAMLIVERSEG_MODELS"] = str(tmp_path_factory.mktemp("user_models"))
    yield Path(os.environ["SAMLIVERSEG_MODELS"])
    if old is None:
        os.environ.pop("SAMLIVERSEG_MODELS", None)
    else:
        os.environ["SAMLIVERSEG_MODELS"] = old


tiny_model = tiny_sam_fixture(TINY)


def write_pair(folder, name, seed, label_image=None):
    folder.mkdir(parents=True, exist_ok=True)
    p = make_phantom(SHAPE, SPACING, seed=seed, n_tumors=1)
    sitk.WriteImage(p.to_sitk("hu"), str(folder / f"{name}.nii.gz"))
    lab = p.to_sitk("labels") if label_image is None else label_image(p.to_sitk("labels"))
    sitk.WriteImage(lab, str(folder / f"{name}_label.nii.gz"))
    return p


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two labelled phantoms (one train, one val), a prepared cache and tiny SAM weights."""
    root = tmp_path_factory.mktemp("bad_input")
    for i in range(2):
        write_pair(root / "pairs", f"p{i}", i)
    cache = root / "cache"
    assert cli_main(["prepare", str(root / "pairs"), "-o", str(cache), "--val-fraction", "0.5"]) == 0
    weights = save_tiny_sam(root / f"{TINY}.pth", seed=0)
    return {"root": root, "cache": cache, "weights": weights}


def config(data, out, path, **kw):
    d = dict(kind="decoder", cache=str(data["cache"]), output=str(out), base_model=TINY,
             checkpoint=str(data["weights"]), epochs=1, batch_size=2, max_slices_per_case=3, seed=0, device="cpu")
    d.update(kw)
    Path(path).write_text(json.dumps(d))  # JSON is YAML
    return Path(path)


# ------------------------------------------------------------------------------- prepare
def test_prepare_empty_folder_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["prepare", str(tmp_path / "empty"), "-o", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no images" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_prepare_labels_off_grid_all_bad_exit_2_with_reasons(tmp_path, capsys):
    def other_spacing(lab):
        lab.SetSpacing((3.0, 3.0, 4.0))
        return lab

    def shifted(lab):
        lab.SetOrigin(tuple(o + 7.5 for o in lab.GetOrigin()))
        return lab

    write_pair(tmp_path / "d", "a", 1, other_spacing)
    write_pair(tmp_path / "d", "b", 2, shifted)
    assert cli_main(["prepare", str(tmp_path / "d"), "-o", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "no case could be converted" in err and "Traceback" not in err
    assert "a: label not on the image grid: spacing (3, 3, 4) differs" in err
    assert "b: label not on the image grid: origin" in err
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert not list((tmp_path / "cache" / "cases").glob("*.npz"))
    # one good case beside them: exit 0, the two others reported in the manifest's problems
    write_pair(tmp_path / "d", "c", 3)
    assert cli_main(["prepare", str(tmp_path / "d"), "-o", str(tmp_path / "cache")]) == 0
    m = load_manifest(tmp_path / "cache")
    assert [c["id"] for c in m["cases"]] == ["c"]
    assert {p["case"]: p["kind"] for p in m["problems"]} == {"a": "grid_mismatch", "b": "grid_mismatch"}
    assert "skipped a: grid_mismatch" in capsys.readouterr().out


def test_prepare_explicit_split(tmp_path, capsys):
    d = tmp_path / "d"
    for n in range(4):
        write_pair(d, f"c{n}", n)
    ds = {"training": [{"image": f"c{n}.nii.gz", "label": f"c{n}_label.nii.gz", "patient": "P"} for n in range(4)]}
    ds["training"][0]["split"] = "test"
    ds["training"][1]["split"] = "val"
    (d / "dataset.json").write_text(json.dumps(ds))
    out = tmp_path / "cache"
    # one patient: the random split alone puts all four in train; the explicit keys win
    assert cli_main(["prepare", str(d / "dataset.json"), "-o", str(out)]) == 0
    m = load_manifest(out)
    got = {c["id"]: (c["split"], c["split_source"]) for c in m["cases"]}
    assert got == {"c0": ("test", "explicit"), "c1": ("val", "explicit"), "c2": ("train", "random"),
                   "c3": ("train", "random")}
    assert m["settings"]["explicit_splits"] == 2 and m["settings"]["split_file"] is None
    assert "patient P has cases in train and val and test" in capsys.readouterr().err
    # --split-file wins over the entries' keys; the converted cases are reused (split not in the hash)
    sf = tmp_path / "split.json"
    sf.write_text(json.dumps({"c0": "train", "c3": "test"}))
    assert cli_main(["prepare", str(d / "dataset.json"), "-o", str(out), "--split-file", str(sf)]) == 0
    m = load_manifest(out)
    assert {c["id"]: c["split"] for c in m["cases"]} == {"c0": "train", "c1": "val", "c2": "train", "c3": "test"}
    assert m["summary"]["converted"] == 0 and m["summary"]["reused"] == 4
    assert m["settings"]["split_file"] == str(sf.resolve()) and m["settings"]["explicit_splits"] == 3
    # a folder of pairs (no dataset.json) with a split file, and the errors
    pairs = tmp_path / "pairs"
    for n in range(2):
        write_pair(pairs, f"q{n}", n)
    sf.write_text(json.dumps({"q1": "val"}))
    assert cli_main(["prepare", str(pairs), "-o", str(tmp_path / "c2"), "--split-file", str(sf),
                     "--val-fraction", "0"]) == 0
    assert {c["id"]: c["split"] for c in load_manifest(tmp_path / "c2")["cases"]} == {"q0": "train", "q1": "val"}
    capsys.readouterr()
    for bad, words in (({"q9": "train"}, "not in the input: q9"), ({"q0": "training"}, "'training'"),
                       (["q0"], "JSON object")):
        sf.write_text(json.dumps(bad))
        assert cli_main(["prepare", str(pairs), "-o", str(tmp_path / "c3"), "--split-file", str(sf)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    ds["training"][2]["split"] = "holdout"
    (d / "dataset.json").write_text(json.dumps(ds))
    assert cli_main(["prepare", str(d / "dataset.json"), "-o", str(tmp_path / "c4")]) == 2
    assert "'split' must be one of train, val, test, got 'holdout'" in capsys.readouterr().err
    assert not (tmp_path / "c3").exists() and not (tmp_path / "c4" / "manifest.json").exists()


# ------------------------------------------------------------------------------- train: config
def test_train_unknown_key_subprocess_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cache: c\noutput: o\nlearning_rate: 0.1\n")
    r = subprocess.run([sys.executable, "-m", "samliverseg", "train", "--config", str(cfg)], capture_output=True,
                       text=True, env=env(), timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    ev = read_events(r.stdout)
    assert len(ev) == 1 and ev[0]["event"] == "error" and ev[0]["exit_code"] == 2
    assert "'learning_rate'" in ev[0]["message"]
    assert all(line.startswith("{") for line in r.stdout.splitlines())  # stdout: JSON lines only
    assert "Traceback" not in r.stderr and "learning_rate" in r.stderr


def test_train_unknown_key_in_unet_section(tmp_path, capsys):
    try:
        import samliverseg.training.unet  # noqa: F401
    except ImportError:
        pytest.skip("samliverseg.training.unet does not import yet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cache: c\noutput: o\nkind: unet\nunet:\n  bogus_option: 3\n")
    assert cli_main(["train", "--config", str(cfg)]) == 2
    ev = read_events(capsys.readouterr().out)
    assert ev[-1]["event"] == "error" and "unet.bogus_option" in ev[-1]["message"]


# ------------------------------------------------------------------------------- train: resume
def test_resume_from_incompatible_checkpoint_exit_3_files_unchanged(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "--config", str(config(data, run, tmp_path / "liver.yaml", target="liver"))]) == 0
    names = ("last.pt", "best.pt", "model.pth")
    before = {n: sha(run / n) for n in names}
    capsys.readouterr()

    # another target
    assert cli_main(["train", "--config", str(config(data, run, tmp_path / "tumor.yaml", target="tumor")),
                     "--resume"]) == 3
    ev = read_events(capsys.readouterr().out)
    assert ev[-1]["event"] == "error" and ev[-1]["exit_code"] == 3
    assert "target='liver'" in ev[-1]["message"] and "target='tumor'" in ev[-1]["message"]
    assert {n: sha(run / n) for n in names} == before

    # a checkpoint of another trainer kind in the run folder (a real checkpoint file whose config
    # says kind unet, as a unet run would leave it)
    other = tmp_path / "other"
    other.mkdir()
    foreign = ck.load_checkpoint(run / "last.pt")
    foreign["config"]["kind"] = "unet"
    ck.save_checkpoint(foreign, other / "last.pt")
    kept = sha(other / "last.pt")
    assert cli_main(["train", "--config", str(config(data, other, tmp_path / "o.yaml", target="liver")),
                     "--resume"]) == 3
    ev = read_events(capsys.readouterr().out)
    assert ev[-1]["event"] == "error" and "kind='unet'" in ev[-1]["message"]
    assert sha(other / "last.pt") == kept
    assert not (other / "best.pt").exists() and not (other / "model.pth").exists()


# ------------------------------------------------------------------------------- full disk
def _can_mount_tmpfs(tmp_path) -> bool:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{probe}'"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def test_full_disk_while_checkpointing_exit_3_previous_kept(data, tmp_path, capsys):
    """A resumed run in a folder on a really full filesystem (a tmpfs with no page free)."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a private user+mount namespace here (unshare -rm)")
    run = tmp_path / "run"
    assert cli_main(["train", "--config", str(config(data, run, tmp_path / "c1.yaml"))]) == 0
    capsys.readouterr()
    names = ("last.pt", "best.pt", "model.pth")
    before = {n: sha(run / n) for n in names}
    full = tmp_path / "full"
    full.mkdir()
    after = tmp_path / "after"
    after.mkdir()
    cfg = config(data, full / "run", tmp_path / "c3.yaml", epochs=3)
    train = tiny_sam_command("cli", TINY, "train", "--config", cfg, "--resume")
    r = subprocess.run(["unshare", "-rm", "sh", str(SCRIPTS / "resume_on_full_disk.sh"), str(full), str(run), str(after),
                        " ".join(names)] + train, capture_output=True, text=True, env=env(), timeout=240)
    assert r.returncode == 0, r.stderr
    assert (after / "df.txt").read_text().split()[3] == "0"  # really no space left
    rc = int((after / "rc.txt").read_text())
    stderr = (after / "stderr.txt").read_text()
    ev = read_events((after / "stdout.txt").read_text())
    assert rc == 3, stderr
    assert ev[0]["event"] == "start" and ev[0]["resumed"] is True
    assert ev[-1]["event"] == "error" and ev[-1]["exit_code"] == 3
    assert "the disk is full" in ev[-1]["message"] and "unchanged" in ev[-1]["message"]
    assert "Traceback" not in stderr
    assert {n: sha(after / n) for n in names} == before  # the previous checkpoints, byte for byte
    listing = (after / "listing.txt").read_text().split()
    assert not [f for f in listing if is_temp_name(f)]  # no partial file left behind


# ------------------------------------------------------------------------------- out of memory
def test_oom_classification():
    """Only the classification (``train`` uses the project's one detector): a real CUDA OOM cannot
    be produced without a GPU, and reaching the message branch of run_train would need a trainer
    that raises on purpose (a mock)."""
    from samliverseg.core.errors import is_out_of_memory as _is_oom

    assert _is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)"))
    assert _is_oom(RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB"))  # older torch
    assert not _is_oom(RuntimeError("shape mismatch"))
    assert not _is_oom(ValueError("out of range"))


def test_cpu_allocator_oom_is_classified_as_oom():
    from samliverseg.core.errors import is_out_of_memory as _is_oom

    try:
        torch.empty(2**62, dtype=torch.uint8)  # a real allocation failure of torch's CPU allocator
    except RuntimeError as exc:
        err = exc
    else:  # pragma: no cover - no machine has 4 EiB
        pytest.fail("the allocation succeeded")
    assert _is_oom(err)  # -> exit 4 with the CPU-RAM advice, not "unexpected error"
