"""Model families and what the methods need of a model: the registry (families), SAM's and
SAM 2's builders and adapters, DINOv2 (GF-SAM's feature encoder), the input formats, and
image -> encoder input."""
