"""Batch segmentation: a folder of CT files in, segmentations out, one ``samliverseg segment``
subprocess per case (so a crash, an out-of-memory or a cancel never touches Slicer).

Each case needs a prompt. It is looked for, in order, as ``<case>.mrk.json`` beside the image (or
in ``prompts_dir``), then the batch-wide ``default_prompts`` file (an ROI or points in physical
RAS/LPS coordinates, useful when every scan is positioned alike). A case without a prompt is
skipped and reported, not guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .process import BackgroundProcess, samliverseg_command

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NOT_IMAGES = (".seg.nrrd", ".mrk.json")
OUTPUT_FORMATS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz", "nrrd": ".nrrd"}
#: target -> (label value, segment name) written by the CLI
TARGETS = {"liver": (1, "Liver"), "tumor": (2, "Liver tumor")}


def case_name(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_dicom_folder(path: Path) -> bool:
    try:
        return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())
    except OSError:
        return False


def find_images(folder: Path) -> List[Path]:
    """CT files (NIfTI, NRRD, MHA) and DICOM series folders directly inside ``folder``, sorted."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        low = p.name.lower()
        if p.is_file() and low.endswith(IMAGE_SUFFIXES) and not low.endswith(NOT_IMAGES):
            out.append(p)
        elif is_dicom_folder(p):
            out.append(p)
    return out


@dataclass
class BatchJob:
    case: str
    image: Path
    prompts: Optional[Path]
    output: Path
    report: Path
    status: str = "pending"  # pending, running, done, failed, skipped, cancelled
    message: str = ""

    def command(self, model: str, device: str, window: Optional[str], checkpoint: Optional[str],
                target: str, python: Optional[str] = None) -> List[str]:
        label, name = TARGETS[target]
        args = ["segment", str(self.image), "-o", str(self.output), "--prompts", str(self.prompts),
                "--model", model, "--device", device, "--label", str(label), "--segment-name", name,
                "--report", str(self.report)]
        if window:
            args += ["--window", window]
        if checkpoint:
            args += ["--checkpoint", str(checkpoint)]
        return samliverseg_command(*args, python=python)


def plan_batch(input_dir, output_dir, prompts_dir=None, default_prompts=None,
               output_format: str = "seg.nrrd") -> List[BatchJob]:
    """The jobs for every CT in ``input_dir`` (cases without a prompt are ``skipped``)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ValueError(f"input folder {input_dir} does not exist")
    output_dir = Path(output_dir)
    if output_dir.resolve() == input_dir.resolve():
        raise ValueError("the output folder must differ from the input folder")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}: use {', '.join(OUTPUT_FORMATS)}")
    images = find_images(input_dir)
    if not images:
        raise ValueError(f"no CT files (.nii.gz, .nii, .nrrd, .mha or DICOM folders) in {input_dir}")
    jobs = []
    for image in images:
        case = case_name(image)
        candidates = [input_dir / f"{case}.mrk.json"]
        if prompts_dir:
            candidates.insert(0, Path(prompts_dir) / f"{case}.mrk.json")
        prompts = next((c for c in candidates if c.is_file()), None)
        if prompts is None and default_prompts:
            prompts = Path(default_prompts)
        job = BatchJob(case, image, prompts, output_dir / f"{case}{OUTPUT_FORMATS[output_format]}",
                       output_dir / f"{case}.report.json")
        if prompts is None:
            job.status, job.message = "skipped", f"no prompt: put {case}.mrk.json (an ROI or points) beside the image"
        jobs.append(job)
    return jobs


@dataclass
class BatchRunner:
    """Runs jobs one after the other; the GUI calls :meth:`poll` from a timer."""

    jobs: List[BatchJob]
    model: str = "lite_medsam"
    device: str = "auto"
    window: Optional[str] = None
    checkpoint: Optional[str] = None
    target: str = "liver"
    python: Optional[str] = None
    launcher: Optional[Callable] = None
    env: Optional[Dict[str, str]] = None
    current: Optional[BatchJob] = field(default=None, init=False)
    process: Optional[BackgroundProcess] = field(default=None, init=False)
    cancelled: bool = field(default=False, init=False)
    log: List[str] = field(default_factory=list, init=False)

    def runnable(self) -> List[BatchJob]:
        return [j for j in self.jobs if j.status != "skipped"]

    def progress(self) -> tuple:
        """(finished, total) over the runnable jobs."""
        run = self.runnable()
        return sum(1 for j in run if j.status in ("done", "failed", "cancelled")), len(run)

    def done(self) -> bool:
        return self.cancelled or all(j.status not in ("pending", "running") for j in self.jobs)

    def _start_next(self) -> None:
        nxt = next((j for j in self.jobs if j.status == "pending"), None)
        if nxt is None:
            self.current, self.process = None, None
            return
        os.makedirs(nxt.output.parent, exist_ok=True)
        args = nxt.command(self.model, self.device, self.window, self.checkpoint, self.target, self.python)
        kwargs = {"env": self.env}
        if self.launcher is not None:
            kwargs["launcher"] = self.launcher
        self.process = BackgroundProcess(args, **kwargs).start()
        self.current = nxt
        nxt.status = "running"
        self.log.append(f"[{nxt.case}] started")

    def poll(self) -> List[str]:
        """Advance: read output, finish / start jobs. Returns new log lines."""
        new: List[str] = []
        if self.cancelled:
            return new
        if self.process is None:
            self._start_next()
            if self.current is not None:
                new.append(self.log[-1])
            return new
        for ev in self.process.poll():
            if ev.get("event") == "finished":
                rc = ev["returncode"]
                job = self.current
                if rc == 0:
                    job.status = "done"
                    job.message = f"wrote {job.output.name}"
                else:
                    job.status = "failed"
                    errors = [ln for ln in self.process.lines if ln.startswith("error:")]
                    job.message = errors[-1] if errors else f"exit code {rc}"
                line = f"[{job.case}] {job.status}: {job.message}"
                self.log.append(line)
                new.append(line)
                self.process = None
                self._start_next()
                if self.current is not None:
                    new.append(self.log[-1])
                break
            text = ev.get("text") if ev.get("event") == "log" else str(ev)
            line = f"[{self.current.case}] {text}"
            self.log.append(line)
            new.append(line)
        return new

    def cancel(self) -> None:
        self.cancelled = True
        if self.process is not None:
            self.process.cancel()
        for j in self.jobs:
            if j.status in ("pending", "running"):
                j.status = "cancelled"
        self.process, self.current = None, None

    def summary(self) -> str:
        counts: Dict[str, int] = {}
        for j in self.jobs:
            counts[j.status] = counts.get(j.status, 0) + 1
        return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
