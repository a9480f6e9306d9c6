"""Choices offered in the GUI. Importing this module imports nothing else (safe at Slicer startup)."""

#: Models offered in the panel (the registry of the installed library is checked against it).
MODEL_CHOICES = ["lite_medsam", "medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h"]
#: Native 3D models: offered in the effect only (a click prompts the whole volume; user-supplied weights).
MODEL_3D_CHOICES = ["sam_med3d_turbo", "sam_med3d"]
DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]
#: What runs a 2D model (samliverseg.interactive.backends.BACKENDS; checked by a test).
BACKEND_CHOICES = ["auto", "torch", "openvino", "onnxruntime"]
#: The mask decoder's precision (samliverseg.interactive.backends.DECODER_PRECISIONS; checked by a test):
#: fp32, or bf16 for faster corrections where OpenVINO runs bf16 natively (else fp32, with a note).
DECODER_PRECISION_CHOICES = ["fp32", "bf16"]
#: "model" = the window the model was trained with; "custom" = the LOW,HIGH field.
WINDOW_CHOICES = ["model", "wide", "liver", "abdomen", "custom"]
#: Batch: what to segment, and the output format.
TARGET_CHOICES = ["liver", "tumor"]
OUTPUT_FORMAT_CHOICES = ["seg.nrrd", "nii.gz", "nrrd"]
#: Segment names and colours written for each target.
TARGETS = {
    "liver": ("Liver", (0.867, 0.510, 0.396)),
    "tumor": ("Liver tumor", (0.784, 0.235, 0.235)),
}
EFFECT_NAME = "Segment Anything"
