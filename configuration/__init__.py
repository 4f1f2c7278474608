"""Presets by name (`load_preset`) and capacity balancing of looped configs against non-looped references."""

from .presets import available_presets, load_preset, presets_dir

__all__ = ["available_presets", "load_preset", "presets_dir"]
