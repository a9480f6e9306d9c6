"""Bad input through the real CLI (``python -m samliverseg``), one case per class of issue 12.

Every refusal asserts: the documented exit code, exactly one line on stderr (``error: ...``), no
traceback, and that no file in the case's folder changed or appeared (hashes before and after: no
partial output, no temporary file). Cases that must succeed with a warning run the real
LiteMedSAM on a small phantom, on one slice (``--no-propagate``). The classes and the counts are
in SAMLiverSegLib/BAD_INPUT.md.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from libtest_helpers import run_on_small_disk
from samliverseg.core.maskutil import bbox_2d, middle_slice
from samliverseg.demo.phantom import make_phantom

SHAPE_KJI = (16, 96, 96)
SPACING_IJK = (2.5, 2.5, 5.0)


# -- helpers --------------------------------------------------------------------------------------

def cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "samliverseg", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd, preexec_fn=lambda: os.umask(0o022))


def cli_command(*args):
    return [sys.executable, "-m", "samliverseg", *map(str, args)]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its SHA-256 (a changed, new or vanished file shows)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def assert_refused(proc, code: int, words, folder: Path, before: dict) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    line = error_line(proc)
    for w in ([words] if isinstance(words, str) else words):
        assert w.lower() in line.lower(), line
    assert snapshot(folder) == before, "a file changed, appeared or vanished"
    return line


def assert_ok_with_warnings(proc, n_warnings: int) -> list:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == n_warnings, proc.stderr
    assert proc.stdout.startswith("wrote "), proc.stdout
    return warnings


@pytest.fixture(scope="module")
def phantom():
    ph = make_phantom(SHAPE_KJI, SPACING_IJK, seed=5, n_tumors=1)
    k = middle_slice(ph.liver_mask)
    i0, j0, i1, j1 = bbox_2d(ph.liver_mask[k])
    return {"ph": ph, "hu": sitk.GetArrayFromImage(ph.to_sitk("hu")), "k": int(k),
            "box": [i0 - 2, j0 - 2, i1 + 2, j1 + 2, int(k)]}


def write_image(path: Path, array: np.ndarray, spacing=SPACING_IJK) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, str(path), True)
    return path


@pytest.fixture
def ct(tmp_path, phantom) -> Path:
    return write_image(tmp_path / "ct.nii.gz", phantom["hu"].astype(np.float32))


def write_dicom_series(folder: Path, stored_kji: np.ndarray, series_uid: str, description: str,
                       spacing=SPACING_IJK) -> Path:
    """One int16 file per slice, rescale intercept 0: the stored values are what a reader sees.

    GDCM's writer leaves the process in the "C" locale (ASCII): the caller's is put back."""
    import locale

    previous = locale.setlocale(locale.LC_CTYPE)
    try:
        return _write_dicom_series(folder, stored_kji, series_uid, description, spacing)
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def _write_dicom_series(folder: Path, stored_kji: np.ndarray, series_uid: str, description: str, spacing) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(stored_kji).astype(np.int16))
    img.SetSpacing(tuple(float(s) for s in spacing))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetSize()[2]):
        sl = img[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|000d", "1.2.826.0.1.3680043.8.498.1"),
                           ("0008|103e", description), ("0020|0032", f"0\\0\\{k * spacing[2]}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k + 1)),
                           ("0008|0018", f"{series_uid}.{k + 1}"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.2")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{description}_{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def segment(image, output, box, *extra, cwd=None):
    return cli("segment", image, "-o", output, "--box-ijk", *box, "--device", "cpu", "--no-propagate", *extra, cwd=cwd)


# =================================================================================================
# Data lost
# =================================================================================================

def test_output_equal_to_the_input_is_refused(tmp_path, ct, phantom):
    link = tmp_path / "link.nii.gz"
    link.symlink_to(ct)
    before = snapshot(tmp_path)
    for out in (ct, link, tmp_path / "sub" / ".." / "ct.nii.gz"):
        assert_refused(segment(ct, out, phantom["box"]), 2, "is an input", tmp_path, before)


def test_output_inside_the_dicom_input_folder_is_refused(tmp_path, phantom):
    series = write_dicom_series(tmp_path / "series", phantom["hu"], "1.2.826.0.1.3680043.8.498.10", "CT")
    before = snapshot(tmp_path)
    assert_refused(segment(series, series / "liver.nii.gz", phantom["box"]), 2, "inside the input folder",
                   tmp_path, before)


def test_report_equal_to_an_input_or_the_output_is_refused(tmp_path, ct, phantom):
    from samliverseg.io.markups import point_list, write_markups

    prompts = tmp_path / "points.mrk.json"
    write_markups(prompts, point_list("P", [(0.0, 0.0, 0.0)]))
    (tmp_path / "liver.seg.nrrd").write_bytes(b"an existing segmentation")
    before = snapshot(tmp_path)
    assert_refused(segment(ct, tmp_path / "liver.seg.nrrd", phantom["box"], "--report", ct), 2, "--report",
                   tmp_path, before)
    assert_refused(segment(ct, tmp_path / "liver.seg.nrrd", phantom["box"], "--report", tmp_path / "liver.seg.nrrd"),
                   2, "--report", tmp_path, before)
    assert_refused(segment(ct, tmp_path / "liver.seg.nrrd", phantom["box"], "--prompts", prompts,
                           "--report", prompts), 2, "is an input", tmp_path, before)


def _small_disk_case(tmp_path, ct, phantom, name):
    """``segment`` writing ``name`` onto a full tmpfs that holds a good earlier result."""
    seed = tmp_path / "seed"
    seed.mkdir()
    assert segment(ct, seed / name, phantom["box"]).returncode == 0  # the good earlier result
    (seed / "filler").write_bytes(os.urandom(60 * 1024 - (seed / name).stat().st_size % 4096))
    before = snapshot(seed)
    disk = tmp_path / "disk"
    done, after = run_on_small_disk(cli_command("segment", ct, "-o", disk / name, "--box-ijk", *phantom["box"],
                                                "--device", "cpu", "--no-propagate", "--label", 2),
                                    disk, 64, seed=seed, timeout=300)
    assert done.returncode == 5, (done.returncode, done.stdout, done.stderr)
    line = error_line(done)
    assert "disk full" in line and "previous file is kept" in line, line
    assert snapshot(after) == before  # the good result byte for byte, no temporary file left


def test_full_disk_keeps_the_previous_image(tmp_path, ct, phantom):
    _small_disk_case(tmp_path, ct, phantom, "liver.nii.gz")


def test_full_disk_keeps_the_previous_seg_nrrd(tmp_path, ct, phantom):
    _small_disk_case(tmp_path, ct, phantom, "liver.seg.nrrd")


# =================================================================================================
# Wrong input accepted silently
# =================================================================================================

def test_ct_without_its_rescale_intercept_is_refused(tmp_path, phantom):
    stored = write_image(tmp_path / "ct_0_4095.nii.gz", (phantom["hu"] + 1024).astype(np.int16))
    series = write_dicom_series(tmp_path / "series", phantom["hu"] + 1024, "1.2.826.0.1.3680043.8.498.20", "CT")
    before = snapshot(tmp_path)
    for image in (stored, series):
        assert_refused(segment(image, tmp_path / "out.nii.gz", phantom["box"]), 2,
                       ["intercept", "--accept-non-hu", "--window"], tmp_path, before)


def test_8bit_image_is_refused_and_accepted_with_an_explicit_window(tmp_path, phantom):
    from samliverseg.core.windowing import apply_window

    image = write_image(tmp_path / "ct8.nii.gz", apply_window(phantom["hu"], "liver"))
    before = snapshot(tmp_path)
    assert_refused(segment(image, tmp_path / "out.nii.gz", phantom["box"]), 2, ["8-bit", "--accept-non-hu"],
                   tmp_path, before)
    proc = segment(image, tmp_path / "out.nii.gz", phantom["box"], "--window", "0,255")
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"])
def test_truncated_file_is_refused_as_such(tmp_path, phantom, name):
    full = write_image(tmp_path / ("full_" + name), phantom["hu"].astype(np.float32))
    data = full.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) * 2 // 3])
    full.unlink()
    before = snapshot(tmp_path)
    line = assert_refused(segment(cut, tmp_path / "out.nii.gz", phantom["box"]), 2, name, tmp_path, before)
    assert "truncated" in line or "corrupt" in line, line
    assert "slice" not in line.replace("sliced", ""), line  # not blamed on the prompt


def test_cut_dicom_file_is_refused_as_such(tmp_path, phantom):
    series = write_dicom_series(tmp_path / "series", phantom["hu"], "1.2.826.0.1.3680043.8.498.30", "CT")
    victim = sorted(series.iterdir())[7]
    victim.write_bytes(victim.read_bytes()[:-200])
    before = snapshot(tmp_path)
    assert_refused(segment(series, tmp_path / "out.nii.gz", phantom["box"]), 2, [victim.name, "truncated"],
                   tmp_path, before)


def test_folder_with_a_ct_and_a_mask_series_segments_the_ct(tmp_path, phantom):
    """Also: ``.NII.GZ`` (upper case) is written as a gzipped NIfTI, with the umask's permissions."""
    folder = tmp_path / "study"
    write_dicom_series(folder, phantom["hu"], "1.2.826.0.1.3680043.8.498.40", "CT")
    write_dicom_series(folder, phantom["ph"].liver_mask.astype(np.int16) * 255, "1.2.826.0.1.3680043.8.498.41", "liver")
    out = tmp_path / "RESULT.NII.GZ"
    proc = segment(folder, out, phantom["box"])
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:2] == b"\x1f\x8b" and out.stat().st_mode & 0o777 == 0o644
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    k = phantom["k"]
    truth = phantom["ph"].liver_mask[k] > 0
    dice = 2 * (labels[k] > 0)[truth].sum() / ((labels[k] > 0).sum() + truth.sum())
    assert dice > 0.8, dice  # the CT was segmented (a mask series is refused as a label map anyway)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["RESULT.NII.GZ"]


def test_folder_with_two_ct_series_asks_which(tmp_path, phantom):
    folder = tmp_path / "study"
    write_dicom_series(folder, phantom["hu"], "1.2.826.0.1.3680043.8.498.50", "arterial")
    write_dicom_series(folder, phantom["hu"] + 10, "1.2.826.0.1.3680043.8.498.51", "venous")
    before = snapshot(tmp_path)
    assert_refused(segment(folder, tmp_path / "out.nii.gz", phantom["box"]), 2,
                   ["2 image series", "arterial", "venous", "give one file"], tmp_path, before)


def test_mask_series_alone_is_refused(tmp_path, phantom):
    folder = write_dicom_series(tmp_path / "mask", phantom["ph"].liver_mask.astype(np.int16) * 255,
                                "1.2.826.0.1.3680043.8.498.60", "liver")
    before = snapshot(tmp_path)
    assert_refused(segment(folder, tmp_path / "out.nii.gz", phantom["box"]), 2, ["label map", "not a CT"],
                   tmp_path, before)


@pytest.mark.parametrize("label", ["0", "-1", "256", "1.5"])
def test_label_out_of_range_is_refused_at_parse_time(tmp_path, ct, phantom, label):
    before = snapshot(tmp_path)
    assert_refused(segment(ct, tmp_path / "out.nii.gz", phantom["box"], "--label", label), 2, "--label",
                   tmp_path, before)


def test_implausible_spacing_is_refused(tmp_path, phantom):
    """A voxel edge over 20 mm; a box of 18,000 L (the issue's case: 8.7e9 ml)."""
    thick = write_image(tmp_path / "thick.nii.gz", phantom["hu"].astype(np.float32), (25.0, 2.5, 5.0))
    huge = write_image(tmp_path / "huge.nii.gz", np.tile(phantom["hu"][:, :64, :64], (3, 4, 4)).astype(np.float32),
                       (19.0, 19.0, 19.0))
    before = snapshot(tmp_path)
    assert_refused(segment(thick, tmp_path / "out.nii.gz", phantom["box"]), 2, "spacing", tmp_path, before)
    assert_refused(segment(huge, tmp_path / "out.nii.gz", phantom["box"]), 2, " L (", tmp_path, before)


def test_point_on_air_and_whole_slice_box_give_warnings(tmp_path, ct, phantom):
    ni, nj = SHAPE_KJI[2], SHAPE_KJI[1]
    k = phantom["k"]
    report = tmp_path / "report.json"
    proc = cli("segment", ct, "-o", tmp_path / "out.nii.gz", "--box-ijk", 0, 0, ni - 1, nj - 1, k,
               "--point-ijk", 1, 1, k, "--device", "cpu", "--no-propagate", "--report", report)
    warnings = assert_ok_with_warnings(proc, 2)
    assert "air" in warnings[0] and "whole slice" not in warnings[0] and "of the slice" in warnings[1]
    import json

    assert len(json.loads(report.read_text())["warnings"]) == 2


# =================================================================================================
# Confusing
# =================================================================================================

def test_seg_nrrd_or_label_map_as_input_is_not_a_ct(tmp_path, phantom):
    from samliverseg.io.export import write_seg_nrrd
    from samliverseg.io.volume import Volume

    ph = phantom["ph"]
    vol = Volume(phantom["hu"].astype(np.float32), SPACING_IJK)
    seg = write_seg_nrrd(ph.labels, vol, tmp_path / "liver.seg.nrrd")
    plain = tmp_path / "liver_seg.nrrd"
    shutil.copy(seg, plain)  # a Slicer segmentation without the .seg name
    labels = write_image(tmp_path / "labels.nii.gz", ph.labels.astype(np.uint8))
    before = snapshot(tmp_path)
    for image in (seg, plain):
        assert_refused(segment(image, tmp_path / "out.nii.gz", phantom["box"]), 2, ["segmentation", "not a CT"],
                       tmp_path, before)
    assert_refused(segment(labels, tmp_path / "out.nii.gz", phantom["box"]), 2, ["label map", "not a CT"],
                   tmp_path, before)


def test_output_that_is_a_folder_is_refused_before_any_work(tmp_path, ct, phantom):
    (tmp_path / "out.nii.gz").mkdir()
    (tmp_path / "rep.json").mkdir()
    before = snapshot(tmp_path)
    # --model: an unknown name would be the error if the outputs were not checked first
    for args in (("-o", tmp_path / "out.nii.gz"), ("-o", tmp_path / "x.nii.gz", "--report", tmp_path / "rep.json"),
                 ("-o", tmp_path)):
        proc = cli("segment", ct, *args, "--box-ijk", *phantom["box"], "--model", "no_such_model")
        assert_refused(proc, 2, "is a folder", tmp_path, before)


def test_unknown_output_formats_are_refused_before_any_work(tmp_path, ct, phantom):
    before = snapshot(tmp_path)
    for args in (("-o", tmp_path / "out.png"), ("-o", tmp_path / "x.nii.gz", "--report", tmp_path / "r.txt")):
        proc = cli("segment", ct, *args, "--box-ijk", *phantom["box"], "--model", "no_such_model")
        assert_refused(proc, 2, "unknown output format", tmp_path, before)


def test_read_only_report_is_refused_and_kept(tmp_path, ct, phantom):
    report = tmp_path / "report.json"
    report.write_text('{"kept": true}\n')
    report.chmod(0o444)
    before = snapshot(tmp_path)
    assert_refused(segment(ct, tmp_path / "out.nii.gz", phantom["box"], "--report", report), 2, "read-only",
                   tmp_path, before)


def _on_read_only_folder(tmp_path, name, seed_files, cmd):
    """Run ``cmd`` (a function of the folder) with ``seed_files`` on a read-only tmpfs (a user
    and mount namespace: a real read-only file system, even for root)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    ro = tmp_path / name
    ro.mkdir()
    seed = tmp_path / (name + "_seed")
    seed.mkdir()
    for p in seed_files:
        shutil.copy(p, seed / p.name)
    q = shlex.quote
    script = (f"mount -t tmpfs -o size=8m tmpfs {q(str(ro))} && cp -a {q(str(seed))}/. {q(str(ro))}/ && "
              f"mount -o remount,ro {q(str(ro))} && exec {' '.join(q(str(c)) for c in cmd(ro))}")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    if proc.returncode != 0 and "mount" in proc.stderr and "samliverseg" not in proc.stderr:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()[:200]}")
    return proc


def test_read_only_json_and_demo_folder_are_refused_before_any_work(tmp_path, ct, phantom):
    truth = write_image(tmp_path / "truth.nii.gz", phantom["ph"].labels.astype(np.uint8))
    before = snapshot(tmp_path)
    proc = _on_read_only_folder(tmp_path, "ro1", [ct, truth], lambda ro: cli_command(
        "evaluate", ro / "truth.nii.gz", ro / "truth.nii.gz", "--json", ro / "metrics.json"))
    assert proc.returncode == 2 and "cannot write" in error_line(proc), proc.stderr
    proc = _on_read_only_folder(tmp_path, "ro2", [], lambda ro: cli_command("demo", "-o", ro / "demo"))
    assert proc.returncode == 2 and "cannot write" in error_line(proc), proc.stderr
    proc = _on_read_only_folder(tmp_path, "ro3", [], lambda ro: cli_command("demo", "-o", ro))
    assert proc.returncode == 2 and "not writable" in error_line(proc), proc.stderr
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


def test_demo_output_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "results"
    out.write_text("my notes\n")
    before = snapshot(tmp_path)
    assert_refused(cli("demo", "-o", out), 2, "is a file", tmp_path, before)


def test_out_of_memory_on_the_cpu_says_nothing_about_gpus(tmp_path, phantom):
    """A real allocation failure: the address space of the process limited (RLIMIT_AS), a CT
    too large for it; the advice is about the computer's memory."""
    import resource

    big = tmp_path / "big.nii.gz"
    img = sitk.Image(512, 512, 1600, sitk.sitkInt16)  # 800 MB as float32
    img.SetSpacing((0.7, 0.7, 0.5))
    sitk.WriteImage(img, str(big), True)
    limit = 1400 * 1024 * 1024

    def preexec():
        os.umask(0o022)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    before = snapshot(tmp_path)
    proc = subprocess.run(cli_command("segment", big, "-o", tmp_path / "out.nii.gz", "--box-ijk", 1, 1, 50, 50, 800,
                                      "--device", "cpu"), capture_output=True, text=True, env=env,
                          preexec_fn=preexec, timeout=300)
    if proc.returncode == 70 and "import" in proc.stderr.lower():
        pytest.skip(f"the address-space limit stops the interpreter before the test: {proc.stderr[:200]}")
    line = assert_refused(proc, 4, "out of memory", tmp_path, before)
    assert "gpu" not in line.lower() and "--device cpu" not in line, line


def test_cheap_refusals_come_before_torch_is_loaded(tmp_path, ct, phantom):
    """Outputs, truncated files, non-HU images, labels and spacing are judged before torch (let
    alone a model) is imported: the refusal is immediate."""
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(ct.read_bytes()[:100_000])
    stored = write_image(tmp_path / "ct_0_4095.nii.gz", (phantom["hu"] + 1024).astype(np.int16))
    code = ("import sys; from samliverseg.cli.commands import main; rc = main(sys.argv[1:]); "
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(rc)")
    for args in (("segment", ct, "-o", ct, "--box-ijk", *phantom["box"]),
                 ("segment", cut, "-o", tmp_path / "o.nii.gz", "--box-ijk", *phantom["box"]),
                 ("segment", stored, "-o", tmp_path / "o.nii.gz", "--box-ijk", *phantom["box"]),
                 ("segment", ct, "-o", tmp_path / "o.nii.gz", "--report", tmp_path, "--box-ijk", *phantom["box"])):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and error_line(proc), proc.stderr
        assert proc.stdout.strip() == "torch not loaded", proc.stdout
