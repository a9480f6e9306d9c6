"""SAMLiverSeg core library: Segment-Anything-style liver and liver-tumour segmentation on CT."""

__version__ = "0.1.0"
