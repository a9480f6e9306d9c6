"""Layer 2, files: volumes (NIfTI/NRRD/MHA/DICOM), labelmaps, .seg.nrrd and DICOM SEG, Slicer
markups, overlay PNGs, torch files. Imports only ``core``."""
