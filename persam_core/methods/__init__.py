"""Segmentation methods beside PerSAM's cascade (one module per method and concept)."""
