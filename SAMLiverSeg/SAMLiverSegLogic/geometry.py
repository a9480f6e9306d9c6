"""IJK / RAS / LPS geometry of MRML nodes, as numpy matrices.

Slicer works in RAS, the core library (like ITK and DICOM) in LPS; the two differ by
``diag(-1, -1, 1)``. The conversion is ``samliverseg.core.geometry.Grid``'s; in this package it
is reached from here and nowhere else (:func:`volume_grid`).

A node may sit under a parent transform. A slice view shows *world* RAS, so a click is
mapped with the world matrices (``world_ijk_to_ras``); a linear parent transform is supported,
a non-linear (warping) one is refused with a message that says to harden it first.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import vtk

import slicer

from samliverseg.core.errors import InputError
from samliverseg.core.geometry import RAS_TO_LPS, Grid  # noqa: F401 - RAS_TO_LPS: for callers of this module

#: RAS <-> LPS (its own inverse) for homogeneous 4-vectors.
RAS_TO_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def array_from_vtk_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def vtk_matrix_from_array(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's own IJKToRAS (4x4), without its parent transform."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return array_from_vtk_matrix(m)


def node_to_world(node) -> np.ndarray:
    """4x4 matrix from the node's coordinate frame to world RAS (identity without a parent transform)."""
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return np.eye(4)
    m = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, m):
        raise InputError(
            f"'{node.GetName()}' is under a non-linear transform: harden the transform "
            "(Data module, right-click > Harden transform) before segmenting"
        )
    return array_from_vtk_matrix(m)


def world_ijk_to_ras(volume_node) -> np.ndarray:
    """IJK of the volume -> world RAS, parent transforms included."""
    return node_to_world(volume_node) @ ijk_to_ras(volume_node)


def world_ras_to_ijk(volume_node) -> np.ndarray:
    return np.linalg.inv(world_ijk_to_ras(volume_node))


def ras_to_ijk_point(volume_node, ras: Sequence[float]) -> np.ndarray:
    """World RAS point -> continuous IJK (voxel centres at integers)."""
    p = world_ras_to_ijk(volume_node) @ np.array([ras[0], ras[1], ras[2], 1.0])
    return p[:3]


def ijk_to_ras_point(volume_node, ijk: Sequence[float]) -> np.ndarray:
    p = world_ijk_to_ras(volume_node) @ np.array([ijk[0], ijk[1], ijk[2], 1.0])
    return p[:3]


def volume_grid(volume_node) -> Grid:
    """The node's voxel grid (LPS, its own IJKToRAS: the parent transform is not applied)."""
    dims = volume_node.GetImageData().GetDimensions()
    return Grid.from_ijk_to_ras(ijk_to_ras(volume_node), dims)


def geometry_from_ijk_to_ras(m: np.ndarray) -> Tuple[Tuple[float, float, float], np.ndarray, np.ndarray]:
    """IJKToRAS 4x4 -> (spacing (si, sj, sk), origin LPS (3,), direction LPS 3x3 with unit columns),
    as :meth:`Grid.from_ijk_to_ras` computes them (ITK's direction: columns = LPS directions of
    i, j, k, so that ``lps = origin + direction @ (spacing * ijk)``)."""
    g = Grid.from_ijk_to_ras(m, (1, 1, 1))  # the size plays no part in the geometry
    return g.spacing, np.asarray(g.origin), g.direction_matrix


def ijk_to_ras_from_geometry(spacing: Sequence[float], origin_lps: Sequence[float],
                             direction_lps: np.ndarray) -> np.ndarray:
    """The inverse of :func:`geometry_from_ijk_to_ras`: ITK geometry (LPS) -> IJKToRAS 4x4."""
    return Grid((1, 1, 1), spacing, origin_lps, direction_lps).ijk_to_ras_matrix()


def set_ijk_to_ras(volume_node, m: np.ndarray) -> None:
    volume_node.SetIJKToRASMatrix(vtk_matrix_from_array(m))


def ijk_axis_nearest_to(volume_node, direction_ras: Sequence[float]) -> Tuple[str, float]:
    """The IJK axis ('i', 'j' or 'k') of the volume most parallel to a world RAS direction.

    Returns the axis and |cos| of the angle between them (1.0 = exactly aligned).
    """
    lin = world_ijk_to_ras(volume_node)[:3, :3]
    axes = lin / np.linalg.norm(lin, axis=0)
    d = np.asarray(direction_ras, dtype=float)
    d = d / np.linalg.norm(d)
    cos = np.abs(axes.T @ d)
    best = int(np.argmax(cos))
    return "ijk"[best], float(cos[best])
