"""Video: the reference's video mode over SAM (reference_mode) and PerSAM on SAM 2's memory
(sam2_memory)."""
