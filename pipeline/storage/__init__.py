"""Where things are kept: content-keyed caches and atomic JSON files."""
