"""Helpers shared by the core library's tests: the shared real-data folder, rotations, a tiny random-weight
SAM, progress capture and one tiny training config per trainer kind (``models.kinds``).

Subprocesses (torchrun-style tests) import this file too (``sys.path`` + ``import libtest_helpers``)
and call :func:`register_tiny_sam`, so the tiny model exists there as well. The fixtures are in
``conftest.py``."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import pytest

SHARED = Path(os.environ.get("SAMLIVERSEG_SHARED_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
_skip_no_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared CT data not found at {SHARED} (set SAMLIVERSEG_SHARED_DATA)")


def needs_shared(test):
    """Mark a test that reads ../shared/data; it is skipped with a reason where that is absent."""
    return pytest.mark.shared_data(_skip_no_shared(test))


def rot(axis, deg):
    """A 3x3 rotation about x, y or z by ``deg`` degrees."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    m = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    return np.array(m, dtype=float)


TINY = "tiny_shared_sam"


TESTS_DIR = Path(__file__).resolve().parent


SCRIPTS = TESTS_DIR / "scripts"

#: The tiny SAM ViT every test uses (64 px in, 32 x 4 x 4 embedding); a test overrides a size by name.
TINY_ARCH: Dict[str, Any] = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                                 encoder_global_attn_indexes=(1,), image_size=64, window_size=4, prompt_embed_dim=32,
                                 decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


def build_tiny_sam(**over: Any):
    """A tiny random-weight SAM ViT: :data:`TINY_ARCH` with ``over`` (any ``build_sam_vit`` keyword)."""
    from samliverseg.models.build_sam import build_sam_vit
    args = dict(TINY_ARCH, **over)
    return build_sam_vit(args.pop("encoder_embed_dim"), args.pop("encoder_depth"), args.pop("encoder_num_heads"),
                         args.pop("encoder_global_attn_indexes"), **args)


def tiny_sam_spec(name: str = TINY, arch: Optional[Dict[str, Any]] = None, **over: Any):
    """A ``ModelSpec`` of :func:`build_tiny_sam` (with ``arch``) named ``name``; ``over``: other spec fields
    (``builder`` too, e.g. ``lambda: model`` for a spec attached to an existing model)."""
    from samliverseg.models.build_sam import ModelSpec
    fields: Dict[str, Any] = dict(description="tiny test SAM", builder=functools.partial(build_tiny_sam, **(arch or {})),
                                  checkpoint_filename=f"{name}.pth", image_size=64, window="abdomen", embedding_size=4)
    fields.update(over)
    return ModelSpec(name=name, **fields)


@contextlib.contextmanager
def registered(spec) -> Iterator[str]:
    """Register ``spec`` (replacing any of that name) for the ``with`` block; yields its name."""
    from samliverseg.models.build_sam import register_model, unregister_model
    register_model(spec, replace=True)
    try:
        yield spec.name
    finally:
        unregister_model(spec.name)


def tiny_sam_fixture(name: str, arch: Optional[Dict[str, Any]] = None, **spec: Any):
    """A module-scoped autouse fixture that registers the tiny SAM ``name`` (``arch``, ``spec`` as in
    :func:`tiny_sam_spec`) for the module's tests and yields its name: ``tiny_model = tiny_sam_fixture(TINY)``."""

    @pytest.fixture(scope="module", autouse=True)
    def tiny_model():
        with registered(tiny_sam_spec(name, arch, **spec)) as registered_name:
            yield registered_name

    return tiny_model


#: The session's tiny SAM (the ``tiny_sam`` fixture, :func:`register_tiny_sam`): :data:`TINY` with these spec fields.
TINY_SPEC: Dict[str, Any] = dict(normalization="minmax01")


def register_tiny_sam() -> str:
    """Register the session's tiny SAM (:data:`TINY`, as the ``tiny_sam`` fixture does) in this process."""
    from samliverseg.models.build_sam import register_model
    register_model(tiny_sam_spec(TINY, **TINY_SPEC), replace=True)
    return TINY


def register_tiny_sam_json(text: str) -> str:
    """Register the tiny SAM that :func:`tiny_sam_json` wrote (in a subprocess); returns its name."""
    import json

    from samliverseg.models.build_sam import register_model
    return register_model(tiny_sam_spec(**json.loads(text)), replace=True).name


def save_tiny_sam(path: Path, seed: int, **arch: Any) -> Path:
    """Random weights of :func:`build_tiny_sam` (``arch``) drawn after ``torch.manual_seed(seed)``, saved at ``path``."""
    import torch
    torch.manual_seed(seed)
    torch.save(build_tiny_sam(**arch).state_dict(), path)
    return path


def tiny_sam_json(name: str, arch: Optional[Dict[str, Any]] = None, **spec: Any) -> str:
    """The tiny SAM ``name`` (``arch``, ``spec`` as in :func:`tiny_sam_spec`) as JSON, for a subprocess."""
    import json
    return json.dumps(dict(spec, name=name, arch=dict(arch or {})))


def tiny_sam_command(entry: str, name: str, *args: Any, arch: Optional[Dict[str, Any]] = None, **spec: Any):
    """``[python, scripts/run_with_tiny_sam.py, ...]``: a process that registers the tiny SAM ``name``
    (``arch``, ``spec`` as in :func:`tiny_sam_spec`) then runs ``entry`` ("train": ``samliverseg.training.train``,
    "cli": ``samliverseg`` command line) with ``args``."""
    import sys
    return ([sys.executable, str(SCRIPTS / "run_with_tiny_sam.py"), entry, tiny_sam_json(name, arch, **spec)]
            + [str(a) for a in args])


def torchrun_tiny_sam(entry: str, name: str, *args: Any, env: Dict[str, str], timeout: float, cwd=None,
                      arch: Optional[Dict[str, Any]] = None, **spec: Any):
    """A real ``torchrun --standalone --nproc_per_node 2`` (CPU, gloo) of :func:`tiny_sam_command`'s process,
    run to the end: the ``subprocess.CompletedProcess`` (text output)."""
    import subprocess
    import sys
    cmd = tiny_sam_command(entry, name, *args, arch=arch, **spec)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *cmd[1:]], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def tiny_sam_env(env: Dict[str, str], name: str, arch: Optional[Dict[str, Any]] = None, **spec: Any) -> Dict[str, str]:
    """``env`` for a Python process that registers the tiny SAM ``name`` as it starts (whatever it runs):
    ``scripts/tiny_sam_site`` (a ``sitecustomize``) first on ``PYTHONPATH``, the spec in
    ``$SAMLIVERSEG_TEST_TINY_SAM``."""
    path = os.pathsep.join([str(SCRIPTS / "tiny_sam_site"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(env, PYTHONPATH=path, SAMLIVERSEG_TEST_TINY_SAM=tiny_sam_json(name, arch, **spec))


def sigterm_after_first_step(cmd, env: Dict[str, str], timeout: float):
    """Start ``cmd`` (a trainer printing progress lines), send it SIGTERM after its first ``step`` line and
    wait for it; returns the process, every progress event it printed and its stderr."""
    import json
    import signal
    import subprocess

    from samliverseg.training.progress import read_events
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "step":
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=timeout)
    return proc, events + read_events(rest), err


def write_phantom_pairs(folder: Path, n_cases: int, shape, spacing, seed0: int = 0, n_tumors: Any = 1,
                        labels: bool = True, prefix: str = "p") -> Path:
    """``n_cases`` phantoms (seeds ``seed0``...) as NIfTI ``{prefix}{i}.nii.gz`` (+ ``_label``) in ``folder``;
    ``n_tumors``: one count or one per case."""
    import SimpleITK as sitk

    from samliverseg.demo.phantom import make_phantom
    folder.mkdir(parents=True, exist_ok=True)
    counts = [n_tumors] * n_cases if isinstance(n_tumors, int) else list(n_tumors)
    for i in range(n_cases):
        p = make_phantom(tuple(shape), tuple(spacing), seed=seed0 + i, n_tumors=counts[i])
        sitk.WriteImage(p.to_sitk("hu"), str(folder / f"{prefix}{i}.nii.gz"))
        if labels:
            sitk.WriteImage(p.to_sitk("labels"), str(folder / f"{prefix}{i}_label.nii.gz"))
    return folder


def make_phantom_cache(root: Path, n_cases: int, shape, phantom_spacing, seed0: int = 0, n_tumors: Any = 1,
                       n_unlabelled: int = 0, unlabelled_seed0: int = 20, folder: str = "pairs",
                       split: Optional[Dict[str, str]] = None, **prepare: Any) -> Dict[str, Any]:
    """A prepared training cache at ``root/cache`` of ``n_cases`` labelled phantoms (``shape``, ``phantom_spacing``,
    seeds ``seed0``...) in ``root/folder`` (+ ``n_unlabelled`` ones in ``root/unlabelled``, 1 tumour each);
    ``split``: case -> train/val written as ``root/split.json``; ``prepare``: other ``prepare_dataset``
    arguments (seed, val_fraction, window, spacing...). Returns the manifest."""
    import json

    from samliverseg.training.prepare import prepare_dataset
    lab = write_phantom_pairs(root / folder, n_cases, shape, phantom_spacing, seed0, n_tumors)
    if n_unlabelled:
        prepare["unlabelled"] = write_phantom_pairs(root / "unlabelled", n_unlabelled, shape, phantom_spacing,
                                                    unlabelled_seed0, labels=False, prefix="u")
    if split is not None:
        prepare["split_file"] = root / "split.json"
        prepare["split_file"].write_text(json.dumps(split))
    return prepare_dataset(root / "cache", lab, **prepare)


def phantom_caches_in_two_orders(root: Path):
    """One phantom written as NIfTI stored LPS and stored RAS (i and j reversed: the same patient)
    and each prepared into a training cache: ``({"lps": (cache, case), "ras": (cache, case)}, k)``,
    k the slice with the most liver."""
    import SimpleITK as sitk

    from samliverseg.demo.phantom import make_phantom
    from samliverseg.training.prepare import prepare_dataset
    p = make_phantom((10, 48, 48), (3.0, 3.0, 5.0), seed=4, n_tumors=1)
    out = {}
    for order, flip in (("lps", [False, False, False]), ("ras", [True, True, False])):
        folder = root / order / "pairs"
        folder.mkdir(parents=True)
        for name, what in (("p0.nii.gz", "hu"), ("p0_label.nii.gz", "labels")):
            sitk.WriteImage(sitk.Flip(p.to_sitk(what), flip), str(folder / name))
        m = prepare_dataset(root / order / "cache", folder, val_fraction=0.0)
        out[order] = (root / order / "cache", m["cases"][0])
    return out, int(np.argmax((p.labels > 0).sum(axis=(1, 2))))


class Lines:
    """A text stream that keeps what is written (progress lines of a trainer in this process)."""

    def __init__(self):
        self.buf = []

    def write(self, s):
        self.buf.append(s)

    def flush(self):
        pass

    def events(self):
        from samliverseg.training.progress import read_events
        return read_events("".join(self.buf))


def writer():
    from samliverseg.training.progress import ProgressWriter
    out = Lines()
    return ProgressWriter(stream=out, err_stream=Lines()), out


#: A tiny config per kind: seconds per run on a CPU; 2-3 optimiser steps per epoch at 1 process.
TINY_SECTIONS: Dict[str, Dict[str, Any]] = {
    "decoder": {},
    "adapter": {"adapter": {"train_decoder": True}},
    "unet": {"unet": dict(patch_size=[8, 16, 16], channels=[4, 8, 16], strides=[2, 2], num_res_units=0,
                          num_samples=1, dropout=0.1, lr=0.05, coarse_size=[8, 16, 16])},
    "student": {"student": dict(slab_depth=4, hidden=8, slabs_per_case=2, inplane_flip=False)},
    "semi": {"semi": dict(teachers=TINY, warmup_epochs=1, finetune_epochs=0, slab_depth=4, hidden=8, n_transforms=2,
                          weak_views=2, strong_views=1, rampup_epochs=1.0, rampdown_epochs=2.0)},
}


def tiny_config_dict(kind: str, cache: Dict[str, Any], out: Path, **over: Any) -> Dict[str, Any]:
    d: Dict[str, Any] = dict(kind=kind, cache=str(cache["cache"]), output=str(out), epochs=2, batch_size=1, lr=2e-3,
                             seed=5, device="cpu", max_slices_per_case=3, box_jitter_px=2, points_per_slice=1)
    if kind != "unet":
        d.update(base_model=TINY, checkpoint=str(cache["weights"]))
    else:
        for key in ("lr", "batch_size", "max_slices_per_case", "box_jitter_px", "points_per_slice"):
            d.pop(key)
    d.update(TINY_SECTIONS[kind])
    d.update(over)
    return d


def tiny_config(kind: str, cache: Dict[str, Any], out: Path, **over: Any):
    from samliverseg.training.config import config_from_dict
    return config_from_dict(tiny_config_dict(kind, cache, out, **over))


def run_on_small_disk(cmd, disk: Path, size_kb: int, env: Optional[Dict[str, str]] = None,
                      timeout: float = 600, seed: Optional[Path] = None):
    """Run ``cmd`` with a real, small disk: a fresh tmpfs of ``size_kb`` KiB mounted at ``disk``.

    The command runs in its own user and mount namespace (``unshare -r -m``), so no privilege
    is needed and nothing outside changes. Before the command, the files of ``seed`` (a folder)
    are copied onto the small disk (e.g. an existing good result that must survive); after it,
    everything on the small disk is copied to ``disk.parent / (disk.name + ".after")``, which is
    returned with the completed process. Skips the test where user namespaces are not allowed.
    """
    import shlex
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available: no small disk can be mounted")
    disk = Path(disk)
    after = disk.parent / (disk.name + ".after")
    disk.mkdir(parents=True, exist_ok=True)
    after.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(disk))}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {probe.stderr.strip()[:200]}")
    q = shlex.quote
    script = "rc=125; " + " && ".join([
        f"mount -t tmpfs -o size={int(size_kb)}k tmpfs {q(str(disk))}",
        *([f"cp -a {q(str(seed))}/. {q(str(disk))}/"] if seed is not None else []),
        f"{{ {' '.join(q(str(c)) for c in cmd)}; rc=$?; }}",
    ]) + f"; cp -a {q(str(disk))}/. {q(str(after))}/; exit $rc"
    done = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True,
                          env=env, timeout=timeout)
    return done, after


def random_tiny_sam3d():
    """A tiny SAM-Med3D with seeded random weights, its zero-initialised position tables made
    random too (zeros would hide mistakes in how they are applied)."""
    import torch

    from samliverseg.models.build_sam3d import build_sam_med3d_tiny

    torch.manual_seed(0)
    m = build_sam_med3d_tiny()
    for n, p in m.named_parameters():
        if "rel_pos" in n or "pos_embed" in n:
            torch.nn.init.normal_(p, std=0.05)
    return m.eval()
