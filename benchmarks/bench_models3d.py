#!/usr/bin/env python
"""Benchmark of the SAM-Med3D models: size and speed. Prints a table (it is no test).

    .venv/bin/python benchmarks/bench_models3d.py [--device cpu] [--repeats 3] [--generic] [--engine]

* parameter counts of ``sam_med3d`` (= ``sam_med3d_turbo``) and ``sam_med3d_tiny``;
* seconds per 128^3 patch for the image encoder of the full-size model, ms per click for the
  prompt encoder + mask decoder, peak memory. The weights are **random** (the published ones are
  user-supplied): these are timings only, the masks mean nothing;
* ``--generic``: the same encoder with the single-window shortcut off (every padded window token
  computed as a query, as in the published code), to show what the shortcut saves;
* ``--engine``: one click on the shared 3D-IRCADb-01 CT (if present): resampling to 1.5 mm,
  one patch, back to the input grid (random weights: timing only).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from samliverseg.models.build_sam3d import build_sam_med3d_tiny, build_sam_med3d_vit_b, count_parameters
from samliverseg.core.devices import resolve_device


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_encoder(model, device, repeats: int, generic: bool = False) -> list:
    x = torch.randn(1, 1, 128, 128, 128, device=device)
    enc = model.image_encoder
    times = []
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first run warms up
            sync(device)
            t0 = time.perf_counter()
            y = enc.patch_embed(x) + enc.pos_embed
            for blk in enc.blocks:
                y = blk(y, fast_single_window=not generic)
            enc.neck(y.permute(0, 4, 1, 2, 3))
            sync(device)
            if r:
                times.append(time.perf_counter() - t0)
    return times


def time_decoder(model, device, repeats: int) -> list:
    with torch.inference_mode():
        emb = torch.randn(1, 384, 8, 8, 8, device=device)
        pts = (torch.tensor([[[64.0, 64.0, 64.0]]], device=device), torch.tensor([[1]], device=device))
        prev = torch.zeros(1, 1, 32, 32, 32, device=device)
        times = []
        for r in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            prev, _ = model.decode(emb, pts, prev)
            sync(device)
            if r:
                times.append(time.perf_counter() - t0)
    return times


def bench_engine(model, device) -> None:
    import numpy as np

    from samliverseg.demo import sample_data
    from samliverseg.interactive.engine3d import Sam3DEngine, Sam3DSettings

    if sample_data.shared_data_dir() is None:
        print(f"engine: skipped ({sample_data.missing_reason()})")
        return
    volume, masks = sample_data.load_ircadb(structures=("liver",))
    liver = masks["liver"]
    k = int(np.median(np.flatnonzero(liver.any(axis=(1, 2)))))
    jj, ii = np.nonzero(liver[k])
    click = (float(np.median(ii)), float(np.median(jj)), float(k))
    engine = Sam3DEngine(model, device=device, settings=Sam3DSettings(grow=False))
    t0 = time.perf_counter()
    result = engine.segment(volume, [click], [1])
    wall = time.perf_counter() - t0
    t = result.report["timings"]
    print(f"engine on 3D-IRCADb-01 p1 ({'x'.join(map(str, volume.shape))} voxels, working grid "
          f"{'x'.join(map(str, result.report['work_grid_shape_kji']))} at 1.5 mm), one click, one patch: "
          f"{wall:.1f} s (resample {t['resample_s']} s, encode {t['encode_s_per_patch']} s, "
          f"decode {t['decode_ms']} ms, back to the input grid {t['back_to_input_s']} s); random weights")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--generic", action="store_true", help="also time the encoder without the single-window shortcut")
    ap.add_argument("--engine", action="store_true", help="also time one click of the engine on the shared CT")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    tiny = build_sam_med3d_tiny()
    full = build_sam_med3d_vit_b()
    print(f"parameters: sam_med3d / sam_med3d_turbo {count_parameters(full):,}; sam_med3d_tiny {count_parameters(tiny):,}")
    full = full.to(device).eval()
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"device {device}" + (f", {threads} torch threads" if threads else "")
          + ", random weights (timing only)")
    enc = time_encoder(full, device, args.repeats)
    print(f"image encoder, one 128^3 patch: median {statistics.median(enc):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in enc)})")
    if args.generic:
        gen = time_encoder(full, device, args.repeats, generic=True)
        print(f"  without the single-window shortcut: median {statistics.median(gen):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in gen)})")
    dec = time_decoder(full, device, max(args.repeats, 5))
    print(f"prompt encoder + mask decoder, one click: median {1000 * statistics.median(dec):.1f} ms")
    if args.engine:
        bench_engine(full, device)
    mem = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, " if device.type == "cuda" else ""
    print(f"{mem}peak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
