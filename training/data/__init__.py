"""Dataset loaders. Each reads from a data root given by setting or flag, never a hub."""
