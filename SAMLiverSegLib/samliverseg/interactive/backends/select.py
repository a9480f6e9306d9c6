"""Choosing the backend: ``open_backend(model, device, backend, precision, check_input)``.

* ``torch``: the model's own modules (CPU, CUDA, MPS), ``precision`` autocasting the encoder.
* ``onnxruntime`` / ``openvino``: the encoder and the decoder exported and converted once per
  machine (``store.py``), on the CPU. A missing package, a non-CPU device, a precision the
  backend cannot run natively, a model it cannot take (Med-SA adapters), a failed conversion or a
  failed self-check: one line through ``notify`` and the torch backend instead, never a failure.
* ``auto``: the fastest of those installed (OpenVINO, then ONNX Runtime) that passes the
  self-check; torch on GPUs and where none is installed.

Precision: ``fp32`` (default) is pinned in every backend; ``bf16`` runs on OpenVINO only where the
CPU has it natively (else torch's bf16 autocast); ``fp16`` is torch's (GPUs); ``auto`` picks bf16
where the chosen backend runs it natively, else fp32.

Decoder precision (``decoder_precision``, an opt-in for speed): ``fp32`` (default: a mask does not
depend on the CPU) or ``bf16``, which runs on OpenVINO only where the CPU has bf16 natively
(about 0.6 of fp32's time per decode on an avx512_bf16 CPU); elsewhere the decoder stays fp32, with one note.

Self-check: each converted part is run once on a fixed input (``check_input``, a preprocessed
synthetic slice) and compared with torch fp32: the embedding's relative L2 difference must stay
within ``TOLERANCE[precision]``, the decoder's mask logits (a box, then a box and a point) within
``DECODER_TOLERANCE[decoder_precision]``. The result is recorded in the entry (bound to its files' SHA-256), so it
runs once per conversion; a part that fails it is removed and not used.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from samliverseg import __version__
from samliverseg.core.errors import InputError
from samliverseg.interactive.backends import exported, store
from samliverseg.interactive.backends.torch_backend import TORCH_PRECISIONS, Backend, TorchBackend
from samliverseg.io.torchfile import first_sentence

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Largest relative L2 difference of the embedding from torch fp32 that the self-check accepts.
TOLERANCE = {"fp32": 1e-3, "bf16": 0.1}
#: Decoder precisions, and the largest relative L2 difference of its mask logits from torch fp32
#: that the self-check accepts (bf16: 0.006 on the check slice, OpenVINO 2026.4 on an AMD EPYC with avx512_bf16).
DECODER_PRECISIONS = ("fp32", "bf16")
DECODER_TOLERANCE = {"fp32": 1e-3, "bf16": 0.05}
#: ONNX files hold at most 2 GB of weights inline.
MAX_EXPORT_BYTES = 1_500_000_000

Notify = Callable[[str], None]


def print_note(message: str) -> None:
    """The default ``notify``: one line on stderr."""
    print(f"samliverseg: {message}", file=sys.stderr, flush=True)


class Unavailable(Exception):
    """Why a backend cannot be used here (one line). ``quiet``: not worth a note under ``auto``;
    ``missing``: its package is not installed."""

    def __init__(self, message: str, quiet: bool = False, missing: bool = False):
        super().__init__(message)
        self.quiet = quiet
        self.missing = missing


def check_slice(size: int = 256) -> np.ndarray:
    """The fixed synthetic slice of the self-check: body, organs, a lesion and noise (uint8, seeded)."""
    y, x = np.mgrid[0:size, 0:size] / float(size)
    img = 30.0 + 70.0 * (((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1)
    img += 60.0 * (((x - 0.36) / 0.16) ** 2 + ((y - 0.46) / 0.14) ** 2 < 1)
    img -= 40.0 * ((x - 0.33) ** 2 + (y - 0.44) ** 2 < 0.03 ** 2)
    img += 120.0 * ((x - 0.5) ** 2 + (y - 0.7) ** 2 < 0.05 ** 2)
    img += np.random.RandomState(1234).normal(0.0, 6.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def has_adapters(model: torch.nn.Module) -> bool:
    return any(name.rpartition(".")[2].startswith("adapter_") for name, _ in model.named_modules())


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


class _Reference:
    """Torch fp32 outputs on the check input, computed when first needed (shared by the parts)."""

    def __init__(self, model: torch.nn.Module, image: torch.Tensor):
        self.model, self.image = model, image
        self._embedding: Optional[torch.Tensor] = None

    @torch.no_grad()
    def embedding(self) -> torch.Tensor:
        if self._embedding is None:
            self._embedding = self.model.image_encoder(self.image).float()
        return self._embedding

    @torch.no_grad()
    def decoder_cases(self) -> List[Tuple[torch.Tensor, ...]]:
        """Decoder inputs for a box (2 prompt tokens) and a box with a point (3 tokens)."""
        pe = self.model.prompt_encoder
        s = float(self.image.shape[-1])
        box = torch.tensor([[0.2 * s, 0.3 * s, 0.6 * s, 0.65 * s]])
        point = (torch.tensor([[[0.36 * s, 0.46 * s]]]), torch.tensor([[1]]))
        cases = []
        for points in (None, point):
            sparse, dense = pe(points=points, boxes=box, masks=None)
            cases.append((self.embedding(), pe.get_dense_pe(), sparse, dense))
        return cases


def _self_check(runtime: exported.Runtime, part: str, precision: str, ref: _Reference) -> Dict[str, object]:
    if part == "encoder":
        (out,) = runtime.run([ref.image.detach().numpy()])
        err, tol = rel_l2(out, ref.embedding().numpy()), TOLERANCE[precision]
    else:
        err, tol = 0.0, DECODER_TOLERANCE[precision]
        for inputs in ref.decoder_cases():
            masks, _ = runtime.run([t.detach().numpy() for t in inputs])
            with torch.no_grad():
                want, _ = ref.model.mask_decoder.predict_masks(*inputs)
            err = max(err, rel_l2(masks, want.numpy()))
    return {"relative_l2": err, "tolerance": tol, "passed": bool(err <= tol)}


def entry_key(model: torch.nn.Module, part: str, name: str, version: str, precision: str,
              input_size: int) -> Dict[str, object]:
    """The cache key of a converted part: what must all match for an entry to be used."""
    sub = model.image_encoder if part == "encoder" else model.mask_decoder
    return {
        "format": store.FORMAT,
        "part": part,
        "weights_sha256": exported.weights_sha256(sub),
        "backend": name,
        "backend_version": version,
        "precision": precision,
        "input_size": int(input_size),
        "torch": torch.__version__,
        "samliverseg": __version__,
    }


_PART_NAMES = {"encoder": "image encoder", "decoder": "mask decoder"}


def _load_part(name: str, module, version: str, model: torch.nn.Module, part: str, precision: str,
               ref: _Reference, notify: Notify) -> Tuple[exported.Runtime, Optional[float]]:
    key = entry_key(model, part, name, version, precision, int(ref.image.shape[-1]))
    folder = store.entry_dir(key)
    why = store.check_entry(folder, key)
    conversion_s = None
    if why is not None:
        if why != "absent":
            notify(f"the cached {name} {_PART_NAMES[part]} ({folder.name}) is {why}: converting it again")
        label = getattr(getattr(model, "spec", None), "name", "the model")
        notify(f"converting the {_PART_NAMES[part]} of {label} for {name} {precision} (once on this machine) ...")
        t0 = time.perf_counter()
        build = store.new_build_dir()
        try:
            inputs = (ref.image,) if part == "encoder" else ref.decoder_cases()[0]
            exported.export_onnx(model, part, inputs, build / "export.onnx")
            exported.convert(name, module, build / "export.onnx", build)
            conversion_s = time.perf_counter() - t0
            store.write_entry(build, key, {"conversion_s": round(conversion_s, 3), "model": label})
            folder = store.commit(build, key)
        except Exception as exc:
            store.remove(build)
            raise Unavailable(f"converting the {_PART_NAMES[part]} for {name} failed "
                              f"({type(exc).__name__}: {first_sentence(str(exc))})") from exc
        notify(f"converted the {_PART_NAMES[part]} for {name} in {conversion_s:.1f} s")
    try:
        runtime = exported.Runtime(name, module, folder, precision, torch.get_num_threads())
    except Exception as exc:
        store.remove(folder)  # intact files the backend cannot load: build anew next time
        raise Unavailable(f"{name} could not load the converted {_PART_NAMES[part]} "
                          f"({type(exc).__name__}: {first_sentence(str(exc))})") from exc
    meta = store.read_meta(folder) or {}
    check = meta.get("self_check")
    if not (isinstance(check, dict) and check.get("passed") and check.get("files") == meta.get("files")):
        try:
            check = _self_check(runtime, part, precision, ref)
        except Exception as exc:
            store.remove(folder)
            raise Unavailable(f"{name}'s {_PART_NAMES[part]} failed its self-check run "
                              f"({type(exc).__name__}: {first_sentence(str(exc))})") from exc
        if not check["passed"]:
            store.remove(folder)
            raise Unavailable(f"{name}'s {_PART_NAMES[part]} differs from torch on the self-check (relative L2 "
                              f"{check['relative_l2']:.2g} > {check['tolerance']:g}): not used")
        store.update_meta(folder, self_check=dict(check, files=meta.get("files")))
    return runtime, conversion_s


def _open_exported(name: str, model: torch.nn.Module, device: torch.device, precision: str,
                   decoder_precision: str, check_input: torch.Tensor, notify: Notify) -> exported.ExportedBackend:
    if device.type != "cpu":
        raise Unavailable(f"{name} runs on the CPU only; device {device} keeps torch", quiet=True)
    try:
        module = exported.import_backend(name)
    except ImportError as exc:
        pkgs = " ".join(exported.PACKAGES[name])
        raise Unavailable(f"{name} is not installed ({first_sentence(str(exc))}; pip install {pkgs})",
                          quiet=True, missing=True) from None
    version = exported.backend_version(module)
    natively = exported.supported_precisions(name, module)
    if precision == "auto":
        precision = "bf16" if "bf16" in natively else "fp32"
    if precision not in natively:
        raise Unavailable(f"{name} cannot run {precision} natively on this machine (it runs {', '.join(natively)})",
                          quiet=True)
    if has_adapters(model):
        raise Unavailable(f"{name} does not take models with Med-SA adapters yet")
    n_bytes = sum(t.numel() * t.element_size() for t in model.image_encoder.state_dict().values())
    if n_bytes > MAX_EXPORT_BYTES:
        raise Unavailable(f"the image encoder ({n_bytes / 1e9:.1f} GB) is too large for an ONNX export")
    t0 = time.perf_counter()
    ref = _Reference(model, check_input.detach().to("cpu", torch.float32))
    precisions = {"encoder": precision, "decoder": decoder_precision if decoder_precision in natively else "fp32"}
    runtimes, conversion = {}, 0.0
    for part in exported.PARTS:
        runtimes[part], conv = _load_part(name, module, version, model, part, precisions[part], ref, notify)
        conversion += conv or 0.0
    backend = exported.ExportedBackend(name, version, precision, runtimes["encoder"], runtimes["decoder"],
                                       decoder_precision=precisions["decoder"])
    backend.conversion_s = conversion or None
    backend.startup_s = time.perf_counter() - t0
    return backend


def _note_decoder(chosen: Backend, asked: str, note: Notify) -> None:
    if chosen.decoder_precision != asked:
        note(f"the mask decoder runs {chosen.decoder_precision} on {chosen.decoder_backend}: {asked} needs "
             f"OpenVINO on a CPU with native {asked}")


def open_backend(model: torch.nn.Module, device="cpu", backend: str = "torch", precision: str = "fp32",
                 check_input: Optional[torch.Tensor] = None, notify: Optional[Notify] = None,
                 decoder_precision: str = "fp32") -> Backend:
    """The backend that runs ``model``'s encoder and decoder (see the module docstring).

    ``check_input``: the self-check's model input (1, 3, S, S), needed by the exported backends
    (``SlicePredictor`` passes :func:`check_slice` preprocessed as its model wants).
    ``notify``: where one-line notes go (fallbacks, conversion); default stderr.
    ``decoder_precision``: ``fp32`` or ``bf16`` (OpenVINO on a CPU with native bf16; elsewhere
    fp32, with a note).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if decoder_precision not in DECODER_PRECISIONS:
        raise InputError(f"unknown decoder precision {decoder_precision!r}: use {', '.join(DECODER_PRECISIONS)}")
    notify = notify or print_note
    device = torch.device(device)
    t0 = time.perf_counter()
    notes: List[str] = []

    def note(message: str) -> None:
        notes.append(message)
        notify(message)

    if backend != "torch":
        if check_input is None:
            raise ValueError("open_backend needs check_input for an exported backend")
        candidates = exported.FAST_BACKENDS if backend == "auto" else (backend,)
        missing = []
        for name in candidates:
            try:
                chosen = _open_exported(name, model, device, precision, decoder_precision, check_input, notify)
            except Unavailable as exc:
                if exc.missing:
                    missing.append(name)
                if backend != "auto":
                    note(f"{exc}; using torch")
                elif not exc.quiet:  # auto: say what failed, not what is merely absent
                    note(str(exc))
                continue
            _note_decoder(chosen, decoder_precision, note)
            chosen.notes = notes
            return chosen
        if backend == "auto" and device.type == "cpu" and len(missing) == len(candidates):
            note("no fast CPU backend is installed (pip install onnxruntime onnx, or openvino onnx); using torch")
        elif backend == "auto" and notes:
            note("no fast backend passed its checks; using torch")
    torch_precision = "fp32" if precision == "auto" else precision
    result = TorchBackend(model, device, torch_precision)
    _note_decoder(result, decoder_precision, note)
    result.notes = notes
    result.startup_s = time.perf_counter() - t0
    return result


__all__ = ["BACKENDS", "DECODER_PRECISIONS", "DECODER_TOLERANCE", "PRECISIONS", "TOLERANCE", "TORCH_PRECISIONS", "Unavailable",
           "check_slice", "entry_key", "has_adapters", "open_backend", "print_note", "rel_l2"]
