"""Experiment configs: one `get_config(arg)` per file, shared recipes in `common`."""
