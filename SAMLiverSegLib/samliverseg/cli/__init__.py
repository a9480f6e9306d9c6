"""Layer 7, the ``samliverseg`` command line (``samliverseg.cli.commands:main``)."""
