"""Layer 7, the demo and its data: synthetic CT phantoms, the shared real cases, ``run_demo``."""
