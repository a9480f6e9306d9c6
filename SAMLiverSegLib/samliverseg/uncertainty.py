"""Old import path, kept for one release: the module is now ``samliverseg.interactive.uncertainty``."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("samliverseg.interactive.uncertainty")
