"""tunefleet.launch: the command line, the recipe schema and the pure generators (no torch import)."""
