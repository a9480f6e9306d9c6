"""Layer 5, prompt-driven segmentation: the slice predictor and its embedding cache, the 2D engine
with propagation, seeded regions, prompt-ensemble uncertainty, the SAM-Med3D click engine."""
