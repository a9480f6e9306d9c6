"""Errors whose message is meant for the user.

Every error the library raises on bad input derives from :class:`SAMLiverSegError`. Its message
is one line that says what is wrong and, where possible, what to do. The CLI prints it as
``error: <message>`` and exits non-zero without a traceback; the Slicer module shows it in a
message box.
"""


class SAMLiverSegError(Exception):
    """Base class: the message is shown to the user as is."""

    exit_code = 2


class InputError(SAMLiverSegError):
    """A missing, unreadable or unsuitable input file or image (2D, RGB, NaNs, ...)."""


class PromptError(InputError):
    """A prompt that cannot be used: outside the volume, an empty box, an empty slice."""


class CheckpointError(SAMLiverSegError):
    """A checkpoint that is missing, corrupt, or of another architecture."""

    exit_code = 3


class WeightsMissingError(CheckpointError):
    """The weights of a model are not present; the message says where to put them."""


class CancelledError(SAMLiverSegError):
    """A long operation (embedding prefetch, propagation) was cancelled by the user."""

    exit_code = 130
