"""Layer 1, the foundation: errors, atomic writes, devices, geometry, windowing, prompts in IJK,
masks and post-processing, metrics, JSON helpers. Imports nothing else of samliverseg."""
