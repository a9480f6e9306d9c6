"""Exported backends: the encoder and decoder as ONNX graphs run by ONNX Runtime or OpenVINO.

Export (once per machine, see ``store.py``): ``torch.onnx.export`` of

* the image encoder: ``image`` (1, 3, S, S) -> ``embeddings`` (1, C, E, E);
* the mask decoder's mask prediction (all mask tokens): ``image_embeddings``, ``image_pe``
  (1, C, E, E), ``sparse`` (1, N, C; N prompt tokens, dynamic), ``dense`` (1, C, E, E) ->
  ``masks`` (1, M, 4E, 4E), ``iou`` (1, M); the single/multi-mask choice is made here, as
  ``MaskDecoder.forward`` makes it. The prompt encoder (a few small ops) stays in torch.

ONNX Runtime runs the ONNX file with all graph optimisations, in float32 (its CPU kernels have
no bf16 path). OpenVINO converts it once to its IR (weights kept in float32, never compressed
to fp16) and compiles each part with the inference precision pinned: ``f32``, or ``bf16`` only when
asked (the encoder's ``precision``, the decoder's ``decoder_precision``) and the CPU has it natively (OpenVINO would otherwise pick bf16 by itself on such CPUs).
Both use as many threads as torch does (``torch.get_num_threads()``).
"""

from __future__ import annotations

import hashlib
import importlib
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from samliverseg.interactive.backends.torch_backend import Backend

#: The exported backends, fastest first on the CPUs measured (see the README's table).
FAST_BACKENDS = ("openvino", "onnxruntime")
#: The Python distribution each backend needs (pip names).
PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
PARTS = ("encoder", "decoder")


def import_backend(name: str):
    """The backend's Python package, or ImportError (also when ``onnx``, the exporter's need, is missing)."""
    importlib.import_module("onnx")
    return importlib.import_module(name)


def backend_version(module) -> str:
    return str(getattr(module, "__version__", None) or module.get_version()).split("-")[0]


def supported_precisions(name: str, module) -> Tuple[str, ...]:
    """Precisions the backend runs natively on this machine's CPU."""
    if name == "openvino":
        caps = module.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return ("fp32", "bf16") if "BF16" in caps else ("fp32",)
    return ("fp32",)


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's weights: every state-dict entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class _DecoderGraph(nn.Module):
    """The mask decoder's mask prediction with every mask token (what gets exported)."""

    def __init__(self, mask_decoder: nn.Module):
        super().__init__()
        self.mask_decoder = mask_decoder

    def forward(self, image_embeddings, image_pe, sparse, dense):
        return self.mask_decoder.predict_masks(image_embeddings, image_pe, sparse, dense)


def example_inputs(model: nn.Module, part: str, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Inputs to trace ``part`` with: the encoder's model input, or the decoder's inputs for a box."""
    if part == "encoder":
        return (image,)
    with torch.no_grad():
        emb = model.image_encoder(image).float()
        pe = model.prompt_encoder
        s = float(image.shape[-1])
        box = torch.tensor([[0.25 * s, 0.25 * s, 0.75 * s, 0.75 * s]])
        sparse, dense = pe(points=None, boxes=box, masks=None)
        return emb, pe.get_dense_pe(), sparse, dense


def export_onnx(model: nn.Module, part: str, inputs: Sequence[torch.Tensor], path: Path) -> None:
    """Export the encoder or the decoder of ``model`` (in eval mode, on the CPU) to ``path``."""
    if part == "encoder":
        graph, names, outputs, dynamic = model.image_encoder, ["image"], ["embeddings"], None
    else:
        graph = _DecoderGraph(model.mask_decoder)
        names, outputs = ["image_embeddings", "image_pe", "sparse", "dense"], ["masks", "iou"]
        dynamic = {"sparse": {1: "tokens"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, tuple(inputs), str(path), dynamo=False, input_names=names, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=17, do_constant_folding=True)


def convert(name: str, module, onnx_path: Path, folder: Path) -> None:
    """Turn the exported ONNX file into what backend ``name`` loads, in ``folder``."""
    if name == "onnxruntime":
        onnx_path.rename(folder / "model.onnx")
        return
    ov_model = module.convert_model(str(onnx_path))
    module.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=False)
    onnx_path.unlink()


class Runtime:
    """One loaded graph: ``run(inputs) -> outputs`` on numpy float32 arrays."""

    def __init__(self, name: str, module, folder: Path, precision: str, threads: int):
        self.name = name
        if name == "onnxruntime":
            opts = module.SessionOptions()
            opts.graph_optimization_level = module.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.session = module.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self.session.get_inputs()]
            self._run: Callable = lambda feed: self.session.run(None, feed)
        else:
            core = module.Core()
            config = {
                # Pinned: OpenVINO picks bf16 by itself on CPUs that have it unless told f32.
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": int(threads),
                "PERFORMANCE_HINT": "LATENCY",
            }
            compiled = core.compile_model(core.read_model(str(folder / "model.xml")), "CPU", config)
            self.compiled = compiled
            self.input_names = [i.get_any_name() for i in compiled.inputs]
            request = compiled.create_infer_request()
            outputs = list(compiled.outputs)
            # share_inputs: the request reads the (contiguous float32) arrays in place, no copy;
            # the outputs are copied out of the request (share_outputs is off), so they stay valid.
            self._run = lambda feed: [r[o] for r in [request.infer(feed, share_inputs=True)] for o in outputs]

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        feed = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in zip(self.input_names, inputs)}
        return self._run(feed)


class ExportedBackend(Backend):
    """Encoder (and decoder, unless it stays in torch) through ONNX Runtime or OpenVINO."""

    def __init__(self, name: str, version: str, precision: str, encoder: Runtime, decoder: Runtime,
                 notes: Optional[List[str]] = None, decoder_precision: str = "fp32"):
        super().__init__(precision, version, name, notes, decoder_precision)
        self.name = name
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.encoder.run([x.detach().cpu().numpy()])
        return torch.from_numpy(out)

    def decode(self, image_embeddings, image_pe, sparse, dense, multimask_output):
        arrays = [t.detach().cpu().float().numpy() for t in (image_embeddings, image_pe, sparse, dense)]
        masks, iou = (torch.from_numpy(a) for a in self.decoder.run(arrays))
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]


__all__ = ["ExportedBackend", "FAST_BACKENDS", "PACKAGES", "PARTS", "Runtime", "backend_version", "convert",
           "example_inputs", "export_onnx", "import_backend", "supported_precisions", "weights_sha256"]
