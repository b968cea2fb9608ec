"""Reading and writing files: path guards and atomic outputs (files)."""
