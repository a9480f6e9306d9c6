"""Old import path, kept for one release: the module is now ``samliverseg.io.volume``."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("samliverseg.io.volume")
