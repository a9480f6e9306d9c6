"""The persistent inference worker (``samliverseg worker``) and its protocol (see WORKER_PROTOCOL.md).

``protocol`` is pure (json, numpy, the core errors): a client imports it without torch.
``server`` runs the worker loop; ``handlers`` holds the engine-side work.
"""
