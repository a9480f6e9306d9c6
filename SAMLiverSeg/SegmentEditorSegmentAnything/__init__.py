"""The "Segment Anything" Segment Editor effect of SAMLiverSeg (registered by the SAMLiverSeg module)."""

from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import *  # noqa: F401,F403

from .SegmentEditorEffect import *  # noqa: F401,F403
