"""``samliverseg``: the command line. A stable contract that scripts and the Slicer module call.

Commands: ``segment``, ``evaluate``, ``demo``, ``models``, ``download``, ``prepare``, ``train``. IJK everywhere means ITK/Slicer index
order (i = column, j = row, k = slice; 0-based; inclusive). Errors on bad input print one line,
``error: ...``, on stderr and exit non-zero, leaving no partial output file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from samliverseg import __version__
from samliverseg.cli.checks import (OneLineParser, custom_window, label_value, out_of_memory_advice, print_warnings, prompt_warnings,
                                    segment_inputs, segment_outputs)
from samliverseg.core.errors import InputError, SAMLiverSegError, is_disk_full, out_of_memory_kind
from samliverseg.core.jsonutil import write_json

#: Exit codes (documented in the README).
EXIT_OK, EXIT_INPUT, EXIT_CHECKPOINT, EXIT_OOM, EXIT_INTERNAL, EXIT_CANCELLED = 0, 2, 3, 4, 70, 130
EXIT_WRITE_FAILED = 5  # a full disk, or an output that did not read back (core.errors.WriteError)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lite_medsam",
                   help="model name: a built-in model or a trained one (see `samliverseg models`); default lite_medsam")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for the model (overrides the cache lookup)")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda or mps")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                   help="image encoder precision: fp32 (default), bf16 (faster on recent CPUs and GPUs), fp16 (GPU), "
                        "auto (bf16 where the backend runs it natively, else fp32)")
    p.add_argument("--decoder-precision", default="fp32", choices=("fp32", "bf16"),
                   help="mask decoder precision: fp32 (default: masks do not depend on the CPU) or bf16 (faster "
                        "corrections; OpenVINO on a CPU with native bf16, else fp32 with a note)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino", "onnxruntime"),
                   help="what runs a 2D model: auto (default: the fastest installed CPU backend that passes a "
                        "self-check, else torch), torch, openvino or onnxruntime (CPU; converted once per machine)")
    p.add_argument("--window", default=None,
                   help="CT window: wide (-500..1000), liver (-300..300), abdomen (W400/L40) or LOW,HIGH in HU; "
                        "default: the model's own")


#: Commands whose arguments come from modules that import torch (slow to start): their full
#: parsers are built only when one of them is asked for (or for the top-level --help).
_HEAVY_COMMANDS = ("prepare", "train", "worker")


def _command_of(argv: Optional[Sequence[str]]) -> Optional[str]:
    """The command word of ``argv`` (the first argument not starting with '-'), else None."""
    for word in (sys.argv[1:] if argv is None else argv):
        if not str(word).startswith("-"):
            return str(word)
    return None


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The CLI's parser. For a command other than prepare/train/worker, those three get their
    help line only (their argument definitions import torch): a cheap refusal of ``segment``
    then takes a fraction of a second, before any model or torch is loaded."""
    light = _command_of(argv) not in (None, *_HEAVY_COMMANDS)
    parser = OneLineParser(prog="samliverseg", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"samliverseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a CT volume from prompts")
    seg.add_argument("image", help="CT volume: NIfTI, NRRD, MHA or a DICOM series folder")
    seg.add_argument("-o", "--output", required=True,
                     help="output: .nii.gz/.nii/.nrrd/.mha labelmap, .seg.nrrd Slicer segmentation, or .dcm DICOM SEG")
    _add_model_args(seg)
    seg.add_argument("--box-ijk", nargs=5, type=float, action="append", default=[],
                     metavar=("I0", "J0", "I1", "J1", "K"),
                     help="a box on axial slice K (repeatable, one box per slice; propagated to 3D between and "
                          "beyond the boxes unless --no-propagate)")
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
    seg.add_argument("--label", type=label_value, default=1, help="label value written for the object, 1..255 (default 1)")
    seg.add_argument("--accept-non-hu", action="store_true",
                     help="segment an image whose intensities do not look like CT HU (8-bit, no rescale intercept); "
                          "an explicit --window LOW,HIGH also accepts it")
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

    prep = sub.add_parser("prepare", help="convert a labelled / unlabelled dataset into a training cache "
                                           "(windowed arrays + geometry, split by patient)")
    if not light:
        from samliverseg.training.prepare import add_prepare_arguments

        add_prepare_arguments(prep)

    from samliverseg.models.kinds import KIND_NAMES

    train = sub.add_parser("train", help=f"train on a prepared cache (kinds: {', '.join(KIND_NAMES)}; "
                                         "`train --help` lists every config key); progress as JSON lines on stdout")
    if not light:
        from samliverseg.training.train import add_train_arguments

        add_train_arguments(train)

    models = sub.add_parser("models", help="list every model usable by name: the built-in ones (SAM family, "
                                           "SAM-Med3D; are their weights present?) and the trained ones")
    models.add_argument("--register", default=None, metavar="MODEL.pth",
                        help="register a trained model.pth (from `samliverseg train`) for use by name")
    models.add_argument("--name", default=None, help="with --register: its name (default: the run folder's name)")
    models.add_argument("--replace", action="store_true", help="with --register: replace a model of that name")
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    dl = sub.add_parser("download", help="download a model's official weights into the cache (SHA-256 checked)")
    dl.add_argument("name", help="model name, e.g. sam_vit_b")

    worker = sub.add_parser("worker", help="the persistent inference worker: JSON-lines requests on stdin, responses "
                                           "on stdout (for Slicer)", formatter_class=argparse.RawDescriptionHelpFormatter)
    if not light:
        from samliverseg.service.protocol import WORKER_HELP
        from samliverseg.service.server import add_worker_arguments

        worker.description = WORKER_HELP
        _add_model_args(worker)
        add_worker_arguments(worker)
    return parser


# -- segment ------------------------------------------------------------------------------------

def _prompts_from_args(args, volume):
    from samliverseg.core.prompts import Prompts, Roi3D, SliceBox

    prompts = Prompts(slice_axis=args.slice_axis)
    if args.box_ijk and args.slice_axis != "k":
        raise InputError("--box-ijk is a box on an axial (k) slice; it cannot be used with --slice-axis j or i")
    for i0, j0, i1, j1, k in args.box_ijk:
        prompts.add_box(SliceBox.axial(i0, j0, i1, j1, k))
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
            for box in extra.all_boxes():
                prompts.add_box(box)
    return prompts


def _print_notes(notes: List[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _segment_automatic(args, entry, volume, prompts, t0: float, t_read: float, notes: List[str]) -> int:
    """An automatic (unet/student) trained model: the whole volume, no prompts (prompts are an error)."""
    import numpy as np

    from samliverseg.api import call_with_cpu_fallback, open_model
    from samliverseg.cli.output import write_result

    if not prompts.is_empty():
        raise InputError(f"model {entry.name!r} ({entry.family}) is automatic: it segments the whole volume "
                         f"and takes no prompts; drop --box-ijk/--roi-ijk/--point-ijk/--negative-ijk/--prompts")
    t1 = time.perf_counter()
    mask = call_with_cpu_fallback(lambda device: np.asarray(open_model(
        args.model, args.checkpoint, device, args.window, precision=args.precision, notes=notes,
        decoder_precision=args.decoder_precision).segment_volume(volume)),
        args.device, notes)  # a GPU out of memory: once more on the CPU
    _print_notes(notes)
    if mask.shape != volume.array.shape:
        raise SAMLiverSegError(f"model {entry.name!r} returned a mask of shape {mask.shape} for a volume of "
                               f"shape {volume.array.shape}")
    voxels = int((mask > 0).sum())
    ks = np.nonzero((mask > 0).any(axis=(1, 2)))[0]
    report = {"model": entry.name, "kind": entry.family, "automatic": True, "voxels": voxels,
              "volume_ml": round(voxels * float(np.prod(volume.spacing)) / 1000.0, 3),
              "slices_with_mask": [int(ks[0]), int(ks[-1])] if ks.size else [],
              "timings": {"total_s": round(time.perf_counter() - t1, 3)}, "notes": notes}
    write_result(args, volume, mask, report, t0, t_read)
    return EXIT_OK


def cmd_segment(args) -> int:
    from samliverseg.cli.output import write_result
    from samliverseg.core.prompts import validate_prompts
    from samliverseg.io.export import check_output_path, check_outputs
    from samliverseg.io.volume import check_ct_input, read_volume

    check_outputs(segment_outputs(args), segment_inputs(args))  # before reading anything
    t0 = time.perf_counter()
    volume = read_volume(args.image)  # truncated/corrupt files, segmentations, the CT among series
    check_output_path(args.output, volume, segment_inputs(args))  # .dcm needs a DICOM series
    check_ct_input(volume, accept_non_hu=args.accept_non_hu or custom_window(args.window))
    from samliverseg.models.registry import find_model  # imports torch
    from samliverseg.models.specs import SAM3D

    entry = find_model(args.model, usable=True)  # an unknown name: the error lists every model
    if entry.family == SAM3D:  # SAM-Med3D: clicks -> one 3D mask (cli/segment3d.py)
        from samliverseg.cli.segment3d import segment_3d

        return segment_3d(args, volume, t0)
    notes: List[str] = []
    if not entry.interactive:
        return _segment_automatic(args, entry, volume, _prompts_from_args(args, volume), t0,
                                  time.perf_counter() - t0, notes)
    prompts = validate_prompts(_prompts_from_args(args, volume), volume.array.shape)  # before loading a model
    warnings = prompt_warnings(prompts, volume)
    t_read = time.perf_counter() - t0

    from samliverseg.api import call_with_cpu_fallback, open_model  # torch: only now

    def run(device: str):
        engine = open_model(args.model, args.checkpoint, device, args.window, precision=args.precision, notes=notes,
                            backend=args.backend, decoder_precision=args.decoder_precision)
        if args.no_postprocess:
            engine.settings.fill_holes = False
            engine.settings.largest_component = False
        engine.set_volume(volume)
        return engine, engine.segment(prompts, propagate=not args.no_propagate)

    engine, result = call_with_cpu_fallback(run, args.device, notes)  # a GPU out of memory: once more on the CPU
    _print_notes(notes)
    report = dict(result.report)
    report["notes"] = notes
    if entry.trained:
        report.update({"model": entry.name, "kind": entry.family, "base_model": entry.info.get("base_model"),
                       "model_path": entry.path, "window": engine.window.spec()})
    if warnings:
        report["warnings"] = warnings
    write_result(args, volume, result.mask, report, t0, t_read)
    print_warnings(warnings)
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from samliverseg.core.evaluation import evaluate_files
    from samliverseg.io.export import JSON_SUFFIXES, check_outputs

    check_outputs([("--json", args.json, JSON_SUFFIXES)], [args.pred, args.ref])
    metrics = evaluate_files(args.pred, args.ref, label=args.label, ref_label=args.ref_label)
    if args.json:
        write_json(args.json, metrics)
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"{key:>16}: {value:.4f}")
        else:
            print(f"{key:>16}: {value}")
    return EXIT_OK


# -- models -------------------------------------------------------------------------------------

def _print_model(r) -> None:
    """One model of ``samliverseg models`` (a ``models.specs.ModelEntry``)."""
    from samliverseg.models.weights import format_size

    if r.trained:
        if r.info.get("error"):
            print(f"\n{r.name}: unusable: {r.info['error']}")
            return
        dice = f"{r.info['best_dice']:.4f}" if r.info.get("best_dice") is not None else "n/a"
        how = "interactive, prompts" if r.interactive else "automatic, no prompts"
        print(f"\n{r.name}: {r.family} ({how}); base model {r.info.get('base_model') or 'n/a'}; "
              f"target {r.info.get('target') or 'n/a'}; best val Dice {dice}")
        print(f"  path: {r.path}")
        return
    default = " (default)" if r.default else ""
    print(f"\n{r.name}{default}: {r.description} [{r.family}]")
    if r.present:
        print(f"  weights: present at {r.path}")
    else:
        size = f", {format_size(r.size)}" if r.size else ""
        print(f"  weights: missing ({r.filename}{size}): {r.where}")
        if r.download_url:
            print(f"  download: {r.download_url}")
    if r.note and r.present:
        print(f"  note: {r.note}")


def cmd_models(args) -> int:
    from samliverseg.core.jsonutil import dumps
    from samliverseg.models.registry import list_models
    from samliverseg.models.user_models import models_dir
    from samliverseg.models.weights import cache_dir

    if args.register:
        from samliverseg.models.user_models import register_trained_model

        entry = register_trained_model(args.register, name=args.name, replace=args.replace)
        print(f"registered {entry.name} ({entry.kind}) in {entry.folder}")
        return EXIT_OK
    if args.name or args.replace:
        raise InputError("--name and --replace go with --register MODEL.pth")
    rows = list_models()  # every model: the SAM family, SAM-Med3D, then the trained ones
    if args.json:
        print(dumps({"weights_cache": str(cache_dir()), "models_folder": str(models_dir()),
                     "models": [r.to_dict() for r in rows]}))
        return EXIT_OK
    print(f"weights cache: {cache_dir()}")
    builtin = [r for r in rows if not r.trained]
    trained = [r for r in rows if r.trained]
    for r in builtin:
        _print_model(r)
    print(f"\ntrained models ({models_dir()}): {len(trained) or 'none'}")
    for r in trained:
        _print_model(r)
    return EXIT_OK


def cmd_prepare(args) -> int:
    from samliverseg.training.prepare import run_prepare

    return run_prepare(args)


def cmd_train(args) -> int:
    from samliverseg.training.train import run_train

    return run_train(args)


def cmd_download(args) -> int:
    from samliverseg.models.registry import download_model

    def progress(done: int, total: Optional[int]) -> None:
        if total:
            print(f"\rdownloading {args.name}: {100 * done // total}%", end="", file=sys.stderr, flush=True)

    path = download_model(args.name, progress=progress)
    print(f"\n{args.name}: {path}")
    return EXIT_OK


# -- demo ---------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from samliverseg.demo.run import check_demo_outputs, run_demo

    check_demo_outputs(args)  # before the phantom is built or a model loaded
    run_demo(args)
    return EXIT_OK


def cmd_worker(args) -> int:
    from samliverseg.service.server import run_worker

    return run_worker(args)


COMMANDS = {"segment": cmd_segment, "evaluate": cmd_evaluate, "demo": cmd_demo, "models": cmd_models,
            "download": cmd_download, "prepare": cmd_prepare, "train": cmd_train, "worker": cmd_worker}


def _quiet_native_libraries() -> None:
    """No ITK or HDF5 warnings before the one-line message: ITK's global warning display off,
    HDF5's library-version warning off (read when HDF5 starts, so set before it loads). What
    native code still prints while reading or writing an image (NIfTI's "** ERROR", GDCM, HDF5
    diagnostics) is captured by ``io.volume.itk_quiet`` around every read and write."""
    os.environ.setdefault("HDF5_DISABLE_VERSION_CHECK", "2")
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _quiet_native_libraries()
    try:
        return COMMANDS[args.command](args)
    except SAMLiverSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:  # the last line of defence: one line, not a traceback
        kind = out_of_memory_kind(exc)
        if kind is not None:
            print(f"error: {out_of_memory_advice(kind, getattr(args, 'device', 'cpu'))}", file=sys.stderr)
            return EXIT_OOM
        if is_disk_full(exc):
            print("error: disk full: an output could not be written; free some space and run again", file=sys.stderr)
            return EXIT_WRITE_FAILED
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
