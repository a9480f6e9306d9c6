"""``samliverseg``: the command line. A stable contract that scripts and the Slicer module call.

Commands: ``segment``, ``evaluate``, ``demo``, ``models``, ``download``, ``prepare``, ``train``. IJK everywhere means ITK/Slicer index
order (i = column, j = row, k = slice; 0-based; inclusive). Errors on bad input print one line,
``error: ...``, on stderr and exit non-zero, leaving no partial output file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from samliverseg import __version__
from samliverseg.core.errors import InputError, SAMLiverSegError

#: Exit codes (documented in the README).
EXIT_OK, EXIT_INPUT, EXIT_CHECKPOINT, EXIT_OOM, EXIT_INTERNAL, EXIT_CANCELLED = 0, 2, 3, 4, 70, 130


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lite_medsam",
                   help="model name: a built-in model or a trained one (see `samliverseg models`); default lite_medsam")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for the model (overrides the cache lookup)")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda or mps")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="image encoder precision: fp32 (default), bf16 (faster on recent CPUs and GPUs), fp16 (GPU)")
    p.add_argument("--window", default=None,
                   help="CT window: wide (-500..1000), liver (-300..300), abdomen (W400/L40) or LOW,HIGH in HU; "
                        "default: the model's own")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samliverseg", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"samliverseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a CT volume from prompts")
    seg.add_argument("image", help="CT volume: NIfTI, NRRD, MHA or a DICOM series folder")
    seg.add_argument("-o", "--output", required=True,
                     help="output: .nii.gz/.nii/.nrrd/.mha labelmap, .seg.nrrd Slicer segmentation, or .dcm DICOM SEG")
    _add_model_args(seg)
    seg.add_argument("--box-ijk", nargs=5, type=float, metavar=("I0", "J0", "I1", "J1", "K"),
                     help="a box on axial slice K (propagated to 3D unless --no-propagate)")
    seg.add_argument("--roi-ijk", nargs=6, type=float, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                     help="a 3D box: the object is segmented inside it")
    seg.add_argument("--point-ijk", nargs=3, type=float, action="append", default=[], metavar=("I", "J", "K"),
                     help="a positive point (repeatable)")
    seg.add_argument("--negative-ijk", nargs=3, type=float, action="append", default=[], metavar=("I", "J", "K"),
                     help="a negative point (repeatable)")
    seg.add_argument("--prompts", action="append", default=[], metavar="FILE.mrk.json",
                     help="Slicer markups (point list or ROI), RAS or LPS as the file says (repeatable)")
    seg.add_argument("--slice-axis", choices=("k", "j", "i"), default="k",
                     help="the axis the 2D prompts' slices are across (k: axial for an axial CT)")
    seg.add_argument("--no-propagate", action="store_true", help="segment only the prompted slice(s)")
    seg.add_argument("--no-postprocess", action="store_true", help="keep holes and all connected components")
    seg.add_argument("--label", type=int, default=1, help="label value written for the object (default 1)")
    seg.add_argument("--segment-name", default=None,
                     help="segment name in .seg.nrrd / DICOM SEG (default: Liver for label 1, Liver tumor for 2)")
    seg.add_argument("--report", default=None, help="write a JSON report (timings, prompts, voxel counts)")

    ev = sub.add_parser("evaluate", help="compare a segmentation with a reference (MONAI metrics)")
    ev.add_argument("pred")
    ev.add_argument("ref")
    ev.add_argument("--label", type=int, default=None, help="label of PRED to evaluate (default: any non-zero)")
    ev.add_argument("--ref-label", type=int, default=None, help="label of REF (default: any non-zero)")
    ev.add_argument("--json", default=None, help="write the metrics as JSON")

    demo = sub.add_parser("demo", help="segment the liver and a tumour of a synthetic phantom (or IMAGE) and report")
    demo.add_argument("image", nargs="?", default=None, help="optional real CT; default: a synthetic phantom")
    demo.add_argument("--reference", default=None, help="reference labelmap for IMAGE (for Dice)")
    demo.add_argument("--box-ijk", nargs=5, type=float, metavar=("I0", "J0", "I1", "J1", "K"),
                      help="box for IMAGE (default: from the reference's middle slice)")
    demo.add_argument("-o", "--output-dir", default="output/demo", help="where to write the results")
    demo.add_argument("--seed", type=int, default=0, help="phantom seed")
    _add_model_args(demo)

    from samliverseg.training.prepare import add_prepare_arguments

    prep = sub.add_parser("prepare", help="convert a labelled / unlabelled dataset into a training cache "
                                           "(windowed arrays + geometry, split by patient)")
    add_prepare_arguments(prep)

    from samliverseg.training.train import add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train on a prepared cache (kinds: decoder, unet, adapter, student, semi); "
                                                     "progress as JSON lines on stdout"))

    models = sub.add_parser("models", help="list the built-in models (are their weights present?) and the trained "
                                           "models usable by name")
    models.add_argument("--register", default=None, metavar="MODEL.pth",
                        help="register a trained model.pth (from `samliverseg train`) for use by name")
    models.add_argument("--name", default=None, help="with --register: its name (default: the run folder's name)")
    models.add_argument("--replace", action="store_true", help="with --register: replace a model of that name")
    dl = sub.add_parser("download", help="download a model's official weights into the cache (SHA-256 checked)")
    dl.add_argument("name", help="model name, e.g. sam_vit_b")

    from samliverseg.service.protocol import WORKER_HELP
    from samliverseg.service.server import add_worker_arguments

    worker = sub.add_parser("worker", help="the persistent inference worker: JSON-lines requests on stdin, responses "
                                           "on stdout (for Slicer)", description=WORKER_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(worker)
    add_worker_arguments(worker)
    return parser


# -- segment ------------------------------------------------------------------------------------

def _prompts_from_args(args, volume):
    from samliverseg.core.prompts import Prompts, Roi3D, SliceBox

    prompts = Prompts(slice_axis=args.slice_axis)
    if args.box_ijk:
        i0, j0, i1, j1, k = args.box_ijk
        if args.slice_axis != "k":
            raise InputError("--box-ijk is a box on an axial (k) slice; it cannot be used with --slice-axis j or i")
        prompts.box = SliceBox.axial(i0, j0, i1, j1, k)
    if args.roi_ijk:
        prompts.roi = Roi3D(*args.roi_ijk)
    prompts.positive += [tuple(p) for p in args.point_ijk]
    prompts.negative += [tuple(p) for p in args.negative_ijk]
    if args.prompts:
        from samliverseg.io.markups import markups_to_prompts

        for path in args.prompts:
            extra = markups_to_prompts(path, volume, slice_axis=args.slice_axis)
            prompts.positive += extra.positive
            prompts.negative += extra.negative
            if extra.roi is not None:
                if prompts.roi is not None:
                    raise InputError("more than one ROI given")
                prompts.roi = extra.roi
            if extra.box is not None:
                prompts.box = extra.box
    return prompts


def _segments_for(label: int, name: Optional[str]):
    from samliverseg.io import export

    if name is None:
        return [{1: export.LIVER, 2: export.LIVER_TUMOR}.get(label, export.LIVER).with_label(label)]
    base = export.LIVER_TUMOR if "tum" in name.lower() else export.LIVER
    return [base.with_label(label, name=name)]


def write_output(labels, volume, path: str, segments) -> None:
    """Write a label array [k, j, i] in the format the path's extension says."""
    from samliverseg.io import export

    low = path.lower()
    if low.endswith(".seg.nrrd"):
        export.write_seg_nrrd(labels, volume, path, segments)
    elif low.endswith(".dcm"):
        export.write_dicom_seg(labels, volume, path, segments)
    elif low.endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
        export.write_labelmap(labels, volume, path)
    else:
        raise InputError(f"unknown output format {path!r}: use .nii.gz, .nrrd, .mha, .seg.nrrd or .dcm")


def _check_output_path(path: str, volume=None) -> None:
    low = path.lower()
    if not low.endswith((".seg.nrrd", ".dcm", ".nii.gz", ".nii", ".nrrd", ".mha")):
        raise InputError(f"unknown output format {path!r}: use .nii.gz, .nrrd, .mha, .seg.nrrd or .dcm")
    if low.endswith(".dcm") and volume is not None and not getattr(volume, "dicom_files", None):
        raise InputError("a DICOM SEG output (.dcm) needs a DICOM series as input")
    parent = Path(path).resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}")


def _write_json(path: str, data: dict) -> None:
    from samliverseg.core.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _trained_model(args):
    """The registered trained model that ``--model`` names (None for a built-in model)."""
    from samliverseg.models.build_sam import MODEL_REGISTRY
    from samliverseg.models.user_models import describe_user_model

    if args.model in MODEL_REGISTRY:
        return None
    if args.checkpoint:
        raise InputError(f"--checkpoint goes with a built-in model; {args.model!r} is not one (a trained model "
                         f"has its own weights)")
    return describe_user_model(args.model)  # metadata only; an unknown name: the error lists the models


def _segment_automatic(args, trained, volume, prompts, t0: float, t_read: float) -> int:
    """An automatic (unet/student) trained model: the whole volume, no prompts (prompts are an error)."""
    import numpy as np

    if not prompts.is_empty():
        raise InputError(f"model {trained.name!r} ({trained.kind}) is automatic: it segments the whole volume "
                         f"and takes no prompts; drop --box-ijk/--roi-ijk/--point-ijk/--negative-ijk/--prompts")
    if args.window:
        raise InputError(f"--window cannot be used with the automatic model {trained.name!r}: it windows the CT "
                         f"as its training cache did")
    from samliverseg.models.user_models import load_user_model

    t1 = time.perf_counter()
    mask = np.asarray(load_user_model(trained, device=args.device).segment_volume(volume, device=args.device))
    if mask.shape != volume.array.shape:
        raise SAMLiverSegError(f"model {trained.name!r} returned a mask of shape {mask.shape} for a volume of "
                               f"shape {volume.array.shape}")
    label = int(args.label)
    write_output((mask > 0).astype("uint8") * label, volume, args.output, _segments_for(label, args.segment_name))
    voxels = int((mask > 0).sum())
    ks = np.nonzero((mask > 0).any(axis=(1, 2)))[0]
    total = round(time.perf_counter() - t1, 3)
    report = {"model": trained.name, "kind": trained.kind, "automatic": True, "voxels": voxels,
              "volume_ml": round(voxels * float(np.prod(volume.spacing)) / 1000.0, 3),
              "slices_with_mask": [int(ks[0]), int(ks[-1])] if ks.size else [], "timings": {"total_s": total},
              "input": str(args.image), "output": str(args.output), "label": label,
              "volume_shape_kji": list(volume.array.shape), "spacing_ijk_mm": list(map(float, volume.spacing)),
              "read_s": round(t_read, 3), "wall_s": round(time.perf_counter() - t0, 3)}
    if args.report:
        _write_json(args.report, report)
    print(f"wrote {args.output}: {report['voxels']} voxels, {report['volume_ml']} ml, "
          f"slices {report['slices_with_mask']} ({total} s)")
    return EXIT_OK


def cmd_segment(args) -> int:
    from samliverseg.models.build_sam3d import is_model3d

    if is_model3d(args.model):  # SAM-Med3D: clicks -> one 3D mask (engine3d.py)
        from samliverseg.interactive.engine3d import segment_cli

        return segment_cli(args)
    from samliverseg.interactive.engine import PromptEngine
    from samliverseg.core.prompts import validate_prompts
    from samliverseg.io.volume import read_volume

    t0 = time.perf_counter()
    volume = read_volume(args.image)
    _check_output_path(args.output, volume)
    trained = _trained_model(args)  # a model trained with `samliverseg train` (user_models.py), else None
    if trained is not None and trained.automatic:
        return _segment_automatic(args, trained, volume, _prompts_from_args(args, volume), t0,
                                  time.perf_counter() - t0)
    prompts = validate_prompts(_prompts_from_args(args, volume), volume.array.shape)  # before loading a model
    t_read = time.perf_counter() - t0
    if trained is not None:  # its trained weights and its training cache's window
        from samliverseg.models.user_models import load_user_model

        engine = load_user_model(trained, device=args.device).engine(device=args.device, window=args.window,
                                                                     precision=args.precision)
    else:
        engine = PromptEngine(model=args.model, checkpoint=args.checkpoint, device=args.device, window=args.window,
                              precision=args.precision)
    if args.no_postprocess:
        engine.settings.fill_holes = False
        engine.settings.largest_component = False
    engine.set_volume(volume)
    result = engine.segment(prompts, propagate=not args.no_propagate)
    labels = result.mask.astype("uint8") * int(args.label)
    write_output(labels, volume, args.output, _segments_for(args.label, args.segment_name))
    report = dict(result.report)
    report.update({"input": str(args.image), "output": str(args.output), "label": int(args.label),
                   "volume_shape_kji": list(volume.array.shape), "spacing_ijk_mm": list(map(float, volume.spacing)),
                   "read_s": round(t_read, 3), "wall_s": round(time.perf_counter() - t0, 3)})
    if trained is not None:
        report.update({"model": trained.name, "kind": trained.kind, "base_model": trained.metadata.get("base_model"),
                       "model_path": str(trained.path), "window": engine.window.spec()})
    if args.report:
        _write_json(args.report, report)
    print(f"wrote {args.output}: {report['voxels']} voxels, {report['volume_ml']} ml, "
          f"slices {report['slices_with_mask']} ({report['timings']['total_s']} s)")
    return EXIT_OK


# -- evaluate -----------------------------------------------------------------------------------

def cmd_evaluate(args) -> int:
    from samliverseg.core.evaluation import evaluate_files, json_safe

    metrics = evaluate_files(args.pred, args.ref, label=args.label, ref_label=args.ref_label)
    if args.json:
        _write_json(args.json, json_safe(metrics))
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"{key:>16}: {value:.4f}")
        else:
            print(f"{key:>16}: {value}")
    return EXIT_OK


# -- models -------------------------------------------------------------------------------------

def _print_user_models() -> None:
    from samliverseg.models.user_models import list_user_models, models_dir

    entries = list_user_models()
    print(f"\ntrained models ({models_dir()}): {len(entries) or 'none'}")
    for m in entries:
        if m.error:
            print(f"\n{m.name}: unusable: {m.error}")
            continue
        dice = f"{m.best_dice:.4f}" if m.best_dice is not None else "n/a"
        how = "automatic, no prompts" if m.automatic else "interactive, prompts"
        print(f"\n{m.name}: {m.kind} ({how}); base model {m.base_model or 'n/a'}; target {m.target or 'n/a'}; "
              f"best val Dice {dice}")
        print(f"  path: {m.path}")


def cmd_models(args) -> int:
    from samliverseg.models.build_sam import model_status
    from samliverseg.models.weights import cache_dir, format_size

    if args.register:
        from samliverseg.models.user_models import register_trained_model

        entry = register_trained_model(args.register, name=args.name, replace=args.replace)
        print(f"registered {entry.name} ({entry.kind}) in {entry.folder}")
        return EXIT_OK
    if args.name or args.replace:
        raise InputError("--name and --replace go with --register MODEL.pth")
    print(f"weights cache: {cache_dir()}")
    for r in model_status():
        default = " (default)" if r.is_default else ""
        print(f"\n{r.name}{default}: {r.description}")
        if r.present:
            print(f"  weights: present at {r.path}")
        else:
            size = f", {format_size(r.size)}" if r.size else ""
            where = f"put {r.filename}{size} in {cache_dir()}, set {r.env_var}, or pass --checkpoint FILE"
            print(f"  weights: missing: {where}")
            if r.download_url:
                print(f"  download: {r.download_url}")
        if r.note and r.present:
            print(f"  note: {r.note}")
    _print_user_models()
    return EXIT_OK


def cmd_prepare(args) -> int:
    from samliverseg.training.prepare import run_prepare

    return run_prepare(args)


def cmd_train(args) -> int:
    from samliverseg.training.train import run_train

    return run_train(args)


def cmd_download(args) -> int:
    from samliverseg.models.build_sam import download_model

    def progress(done: int, total: Optional[int]) -> None:
        if total:
            print(f"\rdownloading {args.name}: {100 * done // total}%", end="", file=sys.stderr, flush=True)

    path = download_model(args.name, progress=progress)
    print(f"\n{args.name}: {path}")
    return EXIT_OK


# -- demo ---------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from samliverseg.demo.run import run_demo

    run_demo(args)
    return EXIT_OK


def cmd_worker(args) -> int:
    from samliverseg.service.server import run_worker

    return run_worker(args)


COMMANDS = {"segment": cmd_segment, "evaluate": cmd_evaluate, "demo": cmd_demo, "models": cmd_models,
            "download": cmd_download, "prepare": cmd_prepare, "train": cmd_train, "worker": cmd_worker}


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t)
    return isinstance(exc, oom_types) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SAMLiverSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if _is_oom(exc):
            print("error: out of memory: use --device cpu, close other GPU programs, or a smaller model", file=sys.stderr)
            return EXIT_OOM
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
