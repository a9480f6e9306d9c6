"""The one JSON sanitiser and JSON writer of the project.

``json_safe`` turns what the library produces (numpy scalars and arrays, tensors, paths, tuples,
non-finite floats) into plain JSON values: arrays and tensors become lists, NaN/inf become
``null``, anything else unknown becomes its ``str``. ``write_json`` writes atomically (``core.atomic.write_text``: fsynced, read back, renamed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Union

from samliverseg.core.atomic import write_text


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data (recursively)."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars/arrays, torch tensors
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    return str(value)


def dumps(value: Any, indent: Union[int, None] = 2) -> str:
    """``json.dumps`` of ``json_safe(value)`` (strict: no NaN in the text)."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False)


def write_json(path: Union[str, os.PathLike], value: Any, indent: Union[int, None] = 2) -> None:
    """Write ``value`` as JSON to ``path`` atomically (a temporary file renamed over the target)."""
    write_text(path, dumps(value, indent=indent) + "\n")
