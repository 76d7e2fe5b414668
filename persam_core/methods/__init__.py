"""Segmentation methods beside PerSAM's cascade (one module per method and concept)."""

from .registry import (ConceptError, FitModels, Method, Shots, get_method, load_concept, method_names,  # noqa: F401
                       method_of, register)
