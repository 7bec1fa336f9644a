"""HTTP routes: predictions and operations."""
