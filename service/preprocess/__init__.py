"""Pre-processing contracts shared by serving and training (no torch here)."""
