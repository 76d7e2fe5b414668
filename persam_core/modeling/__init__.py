"""Model families beside SAM that a method needs (dinov2: GF-SAM's feature encoder)."""
