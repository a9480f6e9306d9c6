"""Layer 3, the model registry: every model a user can name (the SAM family, SAM-Med3D, trained
models), their weights (lookup, download, SHA-256) and how to build and load them."""
