"""Private helpers shared by several rooms of the package (not part of the API)."""
