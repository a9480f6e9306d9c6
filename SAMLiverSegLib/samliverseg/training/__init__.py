"""Training machinery: the dataset cache (``prepare``) and, later, the trainers.

Nothing heavy is imported here; import the submodules you need (``samliverseg.training.prepare``).
"""
