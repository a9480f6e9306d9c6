"""`samliverseg prepare`: dataset discovery, .npz cache, rerun, patient split, bad cases.

Real files only: small phantoms written with SimpleITK into tmp_path.
"""

import argparse
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from samliverseg.core.errors import InputError
from samliverseg.demo.phantom import make_phantom
from samliverseg.training.prepare import (add_prepare_arguments, load_manifest, patient_id, prepare_dataset,
                                          run_prepare, split_patients)
from samliverseg.core.windowing import apply_window

SHAPE, SPACING = (12, 48, 48), (3.0, 3.0, 5.0)


def phantom(seed):
    return make_phantom(SHAPE, SPACING, seed=seed, n_tumors=1)


def write_case(folder, name, seed, label_suffix="_label", ext=".nii.gz", label_dir=None, label_name=None):
    """Write NAME.ext (+ its label) and return the phantom."""
    folder.mkdir(parents=True, exist_ok=True)
    p = phantom(seed)
    sitk.WriteImage(p.to_sitk("hu"), str(folder / f"{name}{ext}"))
    if label_suffix is not None:
        ldir = label_dir or folder
        ldir.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(p.to_sitk("labels"), str(ldir / (label_name or f"{name}{label_suffix}{ext}")))
    return p


def by_id(manifest):
    return {c["id"]: c for c in manifest["cases"]}


def test_pairs_folder_npz_contents_and_geometry(tmp_path):
    data = tmp_path / "data"
    ph = {}
    for n, name in enumerate(["p1_0", "p1_1", "p2", "p3", "p4"]):
        ph[name] = write_case(data, name, n, label_suffix="_seg" if n % 2 else "_label")
    out = tmp_path / "cache"
    m = prepare_dataset(out, data)
    assert m == load_manifest(out)
    assert m["summary"]["converted"] == 5 and m["summary"]["skipped"] == 0 and m["problems"] == []
    cases = by_id(m)
    assert set(cases) == set(ph)
    assert cases["p1_0"]["patient"] == cases["p1_1"]["patient"] == "p1"
    c = cases["p2"]
    assert c["labelled"] and c["shape"] == list(SHAPE) and c["spacing"] == list(SPACING)
    assert c["label_values"] == [0, 1, 2] and c["split"] in ("train", "val")
    with np.load(out / c["file"]) as z:
        p = ph["p2"]
        assert z["image"].dtype == np.uint8 and z["image"].shape == SHAPE
        np.testing.assert_array_equal(z["image"], apply_window(p.hu, "abdomen"))
        assert z["label"].dtype == np.uint8
        np.testing.assert_array_equal(z["label"], p.labels)
        np.testing.assert_allclose(z["spacing"], SPACING)
        np.testing.assert_allclose(z["origin"], p.origin, atol=1e-4)
        np.testing.assert_allclose(z["direction"], np.asarray(p.direction, dtype=float).reshape(3, 3))
        assert tuple(z["original_shape"]) == SHAPE
        assert str(z["source_image"]).endswith("p2.nii.gz") and str(z["source_label"]).endswith("p2_label.nii.gz")
        assert str(z["window"]) == "abdomen" and list(z["window_hu"]) == [-160.0, 240.0]
    # atomic writes leave no temporary files behind
    assert not [f for f in os.listdir(out / "cases") if f.startswith(".")]
    assert sorted(f for f in os.listdir(out) if f.startswith(".")) == []


def test_dataset_json_with_patient_key_test_and_unlabelled(tmp_path):
    root = tmp_path / "Task03_Liver"
    for n in range(4):
        write_case(root / "imagesTr", f"liver_{n}", n, label_dir=root / "labelsTr", label_name=f"liver_{n}.nii.gz")
    write_case(root / "imagesTs", "liver_9", 9, label_suffix=None)
    ds = {"name": "Liver", "labels": {"0": "background", "1": "liver", "2": "cancer"},
          "training": [{"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz",
                        **({"patient": "P-A"} if n < 2 else {})} for n in range(4)],
          "test": ["./imagesTs/liver_9.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(ds))
    unl = tmp_path / "unlabelled"
    write_case(unl, "u_1", 20, label_suffix=None)
    m = prepare_dataset(tmp_path / "cache", root / "dataset.json", unlabelled=unl, val_fraction=0.25)
    cases = by_id(m)
    assert set(cases) == {"liver_0", "liver_1", "liver_2", "liver_3", "liver_9", "u_1"}
    assert cases["liver_0"]["patient"] == cases["liver_1"]["patient"] == "P-A"
    assert cases["liver_2"]["patient"] == "liver_2"  # MSD numbers are patients: not stripped
    assert cases["liver_0"]["split"] == cases["liver_1"]["split"]
    assert cases["liver_9"]["split"] == "test" and not cases["liver_9"]["labelled"]
    assert cases["u_1"]["split"] == "train" and not cases["u_1"]["labelled"]
    assert m["dataset_labels"]["2"] == "cancer"
    with np.load(tmp_path / "cache" / cases["u_1"]["file"]) as z:
        assert "label" not in z.files and z["image"].shape == SHAPE
    # the same folder given as a folder: its dataset.json is used
    m2 = prepare_dataset(tmp_path / "cache", root, unlabelled=unl, val_fraction=0.25)
    assert {c["id"]: c["split"] for c in m2["cases"]} == {c["id"]: c["split"] for c in m["cases"]}


def test_images_tr_labels_tr_folder_with_nnunet_channel(tmp_path):
    root = tmp_path / "nn"
    write_case(root / "imagesTr", "case_001_0000", 1, label_dir=root / "labelsTr", label_name="case_001.nii.gz")
    write_case(root / "imagesTr", "case_002", 2, label_dir=root / "labelsTr", label_name="case_002.nii.gz")
    m = prepare_dataset(tmp_path / "cache", root)
    assert {c["id"] for c in m["cases"]} == {"case_001_0000", "case_002"}
    assert by_id(m)["case_001_0000"]["patient"] == "case_001"


def test_resampling_to_spacing(tmp_path):
    data = tmp_path / "data"
    write_case(data, "a", 0)
    m = prepare_dataset(tmp_path / "cache", data, spacing=(6.0, 6.0, 2.5), window="wide")
    c = m["cases"][0]
    assert c["shape"] == [24, 24, 24] and c["spacing"] == [6.0, 6.0, 2.5]
    assert c["original_shape"] == list(SHAPE) and c["original_spacing"] == list(SPACING)
    with np.load(tmp_path / "cache" / c["file"]) as z:
        assert z["image"].shape == z["label"].shape == (24, 24, 24)
        assert set(np.unique(z["label"])) <= {0, 1, 2} and (z["label"] == 1).any()
        np.testing.assert_allclose(z["spacing"], (6.0, 6.0, 2.5))
        assert tuple(z["original_shape"]) == SHAPE


def test_rerun_skips_converted_cases(tmp_path):
    data = tmp_path / "data"
    for n in range(3):
        write_case(data, f"c{n}", n)
    out = tmp_path / "cache"
    first = prepare_dataset(out, data)
    mtimes = {f: (out / "cases" / f).stat().st_mtime_ns for f in os.listdir(out / "cases")}
    again = prepare_dataset(out, data)
    assert again["summary"]["converted"] == 0 and again["summary"]["reused"] == 3
    assert all(c["reused"] for c in again["cases"])
    assert {f: (out / "cases" / f).stat().st_mtime_ns for f in os.listdir(out / "cases")} == mtimes
    assert [c["shape"] for c in again["cases"]] == [c["shape"] for c in first["cases"]]
    assert [c["label_values"] for c in again["cases"]] == [c["label_values"] for c in first["cases"]]
    # a changed source file is converted again, the others are not
    src = data / "c1.nii.gz"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    third = prepare_dataset(out, data)
    assert {c["id"]: c["reused"] for c in third["cases"]} == {"c0": True, "c1": False, "c2": True}
    # other settings: everything again
    fourth = prepare_dataset(out, data, window="liver")
    assert fourth["summary"]["converted"] == 3
    # a label mapping merges tumour into liver
    fifth = prepare_dataset(out, data, labels="1:1,2:1")
    assert all(c["label_values"] == [0, 1] for c in fifth["cases"])


def test_patient_id_rule():
    assert patient_id("p1_0") == patient_id("p1_1") == "p1"
    assert patient_id("case012-2") == "case012"
    assert patient_id("liver_12") == "liver_12"
    assert patient_id("case_00012_0000") == "case_00012"
    assert patient_id("ircad3") == "ircad3"


def test_split_reproducible_by_patient_and_about_80_20():
    rng = np.random.default_rng(1)
    patients = {f"pat{n:02d}": int(rng.integers(1, 4)) for n in range(60)}
    total = sum(patients.values())
    a = split_patients(patients, 0.2, seed=3)
    assert a == split_patients(dict(reversed(list(patients.items()))), 0.2, seed=3)  # order-independent
    assert split_patients(patients, 0.2, seed=4) != a
    for seed in range(5):
        val = split_patients(patients, 0.2, seed=seed)
        assert abs(sum(patients[p] for p in val) / total - 0.2) <= 0.03
    assert len(split_patients({"a": 1, "b": 1}, 0.2, 0)) == 1  # always a val patient...
    assert split_patients({"a": 1}, 0.2, 0) == set()  # ...but never all of them
    assert split_patients(patients, 0.0, 0) == set()
    with pytest.raises(InputError):
        split_patients(patients, 1.0, 0)


def test_split_end_to_end_keeps_patients_together(tmp_path):
    data = tmp_path / "data"
    names = ["p1_0", "p1_1", "p2_0", "p2_1", "p3", "p4", "p5", "p6", "p7", "p8"]
    for n, name in enumerate(names):
        write_case(data, name, n)
    out = tmp_path / "cache"
    splits = []
    for seed in range(4):
        m = prepare_dataset(out, data, seed=seed)
        s = {c["id"]: c["split"] for c in m["cases"]}
        assert s["p1_0"] == s["p1_1"] and s["p2_0"] == s["p2_1"]
        assert sum(v == "val" for v in s.values()) == 2  # 20 % of 10 cases
        assert prepare_dataset(out, data, seed=seed)["cases"] == [
            {**c, "reused": True} for c in m["cases"]]  # same seed, same split
        splits.append(s)
    assert len({tuple(sorted(s.items())) for s in splits}) > 1  # the seed matters


def test_bad_cases_are_reported_and_skipped(tmp_path, capsys):
    data = tmp_path / "data"
    write_case(data, "good1", 1)
    write_case(data, "good2", 2)
    # label on another grid (different spacing)
    p = write_case(data, "mismatch", 3, label_suffix=None)
    lab = p.to_sitk("labels")
    lab.SetSpacing((3.0, 3.0, 4.0))
    sitk.WriteImage(lab, str(data / "mismatch_label.nii.gz"))
    # empty label
    p = write_case(data, "empty", 4, label_suffix=None)
    sitk.WriteImage(p.to_sitk("labels") * 0, str(data / "empty_label.nii.gz"))
    # 8-bit, non-CT image
    p = phantom(5)
    img8 = sitk.GetImageFromArray(np.clip(p.hu + 100, 0, 255).astype(np.uint8))
    img8.CopyInformation(p.to_sitk("hu"))
    sitk.WriteImage(img8, str(data / "eightbit.nii.gz"))
    sitk.WriteImage(p.to_sitk("labels"), str(data / "eightbit_label.nii.gz"))
    # corrupt image file
    (data / "corrupt.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    sitk.WriteImage(p.to_sitk("labels"), str(data / "corrupt_label.nii.gz"))
    # pairing problems
    write_case(data, "nolabel", 6, label_suffix=None)
    sitk.WriteImage(p.to_sitk("labels"), str(data / "orphan_seg.nii.gz"))

    parser = add_prepare_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(data), "--output", str(tmp_path / "cache")])
    assert run_prepare(args) == 0
    m = load_manifest(tmp_path / "cache")
    assert {c["id"] for c in m["cases"]} == {"good1", "good2"}
    kinds = {p["case"]: p["kind"] for p in m["problems"]}
    assert kinds == {"mismatch": "grid_mismatch", "empty": "empty_label", "eightbit": "non_ct",
                     "corrupt": "unreadable", "nolabel": "missing_label", "orphan_seg": "missing_image"}
    assert all(p["reason"] and "\n" not in p["reason"] for p in m["problems"])
    assert "spacing (3, 3, 4) differs" in next(p["reason"] for p in m["problems"] if p["case"] == "mismatch")
    assert "8-bit" in next(p["reason"] for p in m["problems"] if p["case"] == "eightbit")
    out = capsys.readouterr().out
    assert "2 case(s)" in out and "skipped 6" in out and "skipped mismatch: grid_mismatch" in out
    assert not (tmp_path / "cache" / "cases" / "mismatch.npz").exists()


def test_unusable_input_raises_input_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no images"):
        prepare_dataset(tmp_path / "cache", empty)
    with pytest.raises(InputError, match="holds no images"):
        prepare_dataset(tmp_path / "cache", unlabelled=empty)
    with pytest.raises(InputError, match="nothing to prepare"):
        prepare_dataset(tmp_path / "cache")
    with pytest.raises(InputError, match="does not exist"):
        prepare_dataset(tmp_path / "cache", tmp_path / "nowhere")
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(InputError, match="no case could be converted"):
        prepare_dataset(tmp_path / "cache", ds)
    ds.write_text(json.dumps({"name": "nothing"}))
    with pytest.raises(InputError, match="lists no cases"):
        prepare_dataset(tmp_path / "cache", ds)
    ds.write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        prepare_dataset(tmp_path / "cache", ds)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.nii.gz").write_bytes(b"garbage")
    (only_bad / "x_label.nii.gz").write_bytes(b"garbage")
    parser = add_prepare_arguments(argparse.ArgumentParser())
    with pytest.raises(InputError, match="no case could be converted"):
        run_prepare(parser.parse_args([str(only_bad), "-o", str(tmp_path / "cache2")]))
    with pytest.raises(InputError):
        prepare_dataset(tmp_path / "cache", only_bad, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError):
        prepare_dataset(tmp_path / "cache", only_bad, labels="1-2")
