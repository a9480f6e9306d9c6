"""Backends that run a SAM model's image encoder and mask decoder: torch, ONNX Runtime, OpenVINO.

``open_backend(model, device, backend="auto"|"torch"|"openvino"|"onnxruntime", precision=...)``
(``select.py``) gives a :class:`Backend` with ``encode`` and ``decode``; ``exported.py`` holds the
ONNX export and the two runtimes, ``store.py`` the on-disk cache of converted models.
"""

from samliverseg.interactive.backends.select import (
    BACKENDS,
    DECODER_PRECISIONS,
    PRECISIONS,
    check_slice,
    open_backend,
)
from samliverseg.interactive.backends.torch_backend import TORCH_PRECISIONS, Backend, TorchBackend

__all__ = ["BACKENDS", "DECODER_PRECISIONS", "PRECISIONS", "TORCH_PRECISIONS", "Backend", "TorchBackend", "check_slice", "open_backend"]
