"""The ``samliverseg`` command line, run as a real subprocess: outputs, reports, and the
one-line errors (no traceback, non-zero exit, no partial output) for every kind of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samliverseg.core.maskutil import bbox_2d, middle_slice
from samliverseg.demo.phantom import make_phantom


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "samliverseg", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ph = make_phantom((24, 128, 128), (2.0, 2.0, 4.0), seed=3, n_tumors=1)
    ct = d / "ct.nii.gz"
    sitk.WriteImage(ph.to_sitk("hu"), str(ct))
    truth = d / "truth.nii.gz"
    sitk.WriteImage(ph.to_sitk("labels"), str(truth))
    k = middle_slice(ph.liver_mask)
    box = bbox_2d(ph.liver_mask[k])
    return {"dir": d, "ct": ct, "truth": truth, "k": k, "box": box, "phantom": ph}


def assert_one_line_error(rc, out, err, words, code=2):
    assert rc == code, (rc, out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert words.lower() in lines[0].lower(), lines[0]


def test_segment_writes_labelmap_and_report(case):
    d, (i0, j0, i1, j1), k = case["dir"], case["box"], case["k"]
    out, rep = d / "liver.nii.gz", d / "report.json"
    rc, stdout, err = run_cli("segment", case["ct"], "-o", out, "--box-ijk", i0 - 2, j0 - 2, i1 + 2, j1 + 2, k,
                              "--label", 3, "--report", rep, "--device", "cpu")
    assert rc == 0, err
    img, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(case["ct"]))
    assert img.GetSize() == ref.GetSize() and np.allclose(img.GetSpacing(), ref.GetSpacing())
    assert np.allclose(img.GetOrigin(), ref.GetOrigin()) and np.allclose(img.GetDirection(), ref.GetDirection())
    arr = sitk.GetArrayFromImage(img)
    assert set(np.unique(arr)) == {0, 3}
    report = json.loads(rep.read_text())
    assert report["voxels"] == int((arr == 3).sum()) and report["model"] == "lite_medsam"
    assert report["prompts"]["box_corners_ijk"][0][2] == k
    assert report["timings"]["embed_ms_per_slice"] > 0 and report["timings"]["decode_ms_per_prompt"] > 0
    assert len(set(np.flatnonzero(arr.any(axis=(1, 2))))) > 1  # propagated beyond the prompted slice
    # evaluate against the truth, as JSON
    rc, stdout, err = run_cli("evaluate", out, case["truth"], "--label", 3, "--json", d / "m.json")
    assert rc == 0, err
    m = json.loads((d / "m.json").read_text())
    assert 0.5 < m["dice"] <= 1.0 and m["hd95_mm"] is not None


def test_no_propagate_and_seg_nrrd(case):
    d, (i0, j0, i1, j1), k = case["dir"], case["box"], case["k"]
    out = d / "liver.seg.nrrd"
    rc, _, err = run_cli("segment", case["ct"], "-o", out, "--box-ijk", i0, j0, i1, j1, k, "--no-propagate")
    assert rc == 0, err
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.flatnonzero(arr.any(axis=(1, 2)))) == {k}
    header = out.read_bytes()[:4000].decode("latin-1")
    assert "Segment0_Name:=Liver" in header


def test_models_lists_the_registry():
    rc, out, err = run_cli("models")
    assert rc == 0, err
    for name in ("lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"):
        assert name in out
    sections = {sec.split(":")[0].split(" ")[0]: sec for sec in out.split("\n\n")[1:]}
    assert "weights: present" in sections["lite_medsam"]
    assert "sam_vit_b_01ec64.pth, 375.0 MB" in sections["sam_vit_b"] and "download: https://" in sections["sam_vit_b"]


def test_download_without_a_url_says_where_to_get_the_file(capsys):
    from samliverseg.cli.commands import main

    assert main(["download", "medsam"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "medsam_vit_b.pth" in err[0]


@pytest.mark.parametrize("extra,words", [
    (["--box-ijk", 10, 10, 10, 40, 5], "empty"),
    (["--box-ijk", 500, 500, 600, 600, 5], "outside"),
    (["--point-ijk", 10, 10, 99], "outside the volume"),
    (["--negative-ijk", 10, 10, 5], "positive point"),
    ([], "no prompt"),
])
def test_bad_prompts(case, extra, words):
    out = case["dir"] / "bad.nii.gz"
    rc, o, e = run_cli("segment", case["ct"], "-o", out, *extra)
    assert_one_line_error(rc, o, e, words)
    assert not out.exists()


def test_bad_images(case, tmp_path):
    out = tmp_path / "o.nii.gz"
    assert_one_line_error(*run_cli("segment", tmp_path / "nope.nii.gz", "-o", out, "--point-ijk", 1, 1, 1), "does not exist")
    txt = tmp_path / "notes.nii.gz"
    txt.write_text("not an image")
    assert_one_line_error(*run_cli("segment", txt, "-o", out, "--point-ijk", 1, 1, 1), "")
    img2d = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.int16)), str(img2d))
    assert_one_line_error(*run_cli("segment", img2d, "-o", out, "--point-ijk", 1, 1, 0), "2D")
    nan = tmp_path / "nan.nrrd"
    a = np.zeros((4, 20, 20), np.float32)
    a[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(nan))
    assert_one_line_error(*run_cli("segment", nan, "-o", out, "--point-ijk", 1, 1, 1), "NaN")
    assert not out.exists()
    assert_one_line_error(*run_cli("segment", case["ct"], "-o", tmp_path / "x.dcm", "--point-ijk", 1, 1, 1), "DICOM series")
    assert_one_line_error(*run_cli("segment", case["ct"], "-o", tmp_path / "x.png", "--point-ijk", 1, 1, 1), "format")


def test_bad_checkpoints(case, tmp_path):
    out = tmp_path / "o.nii.gz"
    corrupt = tmp_path / "corrupt.pth"
    # Not a torch file; and one that starts as a pickle of protocol 7 (torch warns before it fails,
    # which random bytes did 1 time in 256)
    for content in (bytes(range(7, 256)) * 16, b"\x80\x07" + bytes(range(256)) * 16):
        corrupt.write_bytes(content)
        rc, o, e = run_cli("segment", case["ct"], "-o", out, "--point-ijk", 60, 60, 10, "--model", "sam_vit_b",
                           "--checkpoint", corrupt)
        assert_one_line_error(rc, o, e, "checkpoint", code=3)
    rc, o, e = run_cli("segment", case["ct"], "-o", out, "--point-ijk", 60, 60, 10, "--model", "sam_vit_b",
                       "--checkpoint", tmp_path / "absent.pth")
    assert_one_line_error(rc, o, e, "absent.pth", code=3)
    rc, o, e = run_cli("segment", case["ct"], "-o", out, "--point-ijk", 60, 60, 10, "--model", "no_such_model")
    assert rc != 0 and "Traceback" not in e and "no_such_model" in e
    assert not out.exists()


def test_evaluate_grid_mismatch(case, tmp_path):
    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.uint8)), str(other))
    rc, o, e = run_cli("evaluate", other, case["truth"])
    assert_one_line_error(rc, o, e, "")


@pytest.mark.shared_data
def test_dicom_series_in_dicom_seg_out(tmp_path):
    from samliverseg.demo import sample_data
    from samliverseg.io.export import read_dicom_seg
    from samliverseg.io.volume import read_volume

    if sample_data.shared_data_dir() is None:
        pytest.skip(sample_data.missing_reason())
    series = sample_data.totalseg_dicom_dir()
    vol = read_volume(series)
    k = vol.array.shape[0] // 2
    ni, nj = vol.array.shape[2], vol.array.shape[1]
    box = [ni // 4, nj // 4, 3 * ni // 4, 3 * nj // 4, k]
    seg, nii = tmp_path / "liver.dcm", tmp_path / "liver.nii.gz"
    for out in (seg, nii):
        rc, _, err = run_cli("segment", series, "-o", out, "--box-ijk", *box, "--no-propagate")
        assert rc == 0, err
    labels = read_dicom_seg(seg, vol)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(nii)))
    assert ref.sum() > 0 and np.array_equal(labels > 0, ref > 0)


def test_prepare_through_the_cli(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for n in range(3):
        ph = make_phantom((12, 48, 48), (3.0, 3.0, 5.0), seed=n, n_tumors=1)
        sitk.WriteImage(ph.to_sitk("hu"), str(data / f"case{n}.nii.gz"))
        sitk.WriteImage(ph.to_sitk("labels"), str(data / f"case{n}_label.nii.gz"))
    rc, out, err = run_cli("prepare", data, "-o", tmp_path / "cache")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["cases"]) == 3 and {c["split"] for c in manifest["cases"]} == {"train", "val"}
    rc, out, err = run_cli("prepare", tmp_path / "empty_does_not_exist", "-o", tmp_path / "cache2")
    assert_one_line_error(rc, out, err, "does not exist")
