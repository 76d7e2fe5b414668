"""Thin Ray / storage shells around persam_core: listing, decoding, the actor, Parquet, CLI."""
