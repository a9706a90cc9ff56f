"""Model definitions: one file per model, math top to bottom."""
