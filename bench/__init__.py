"""The pipeline benchmark: `make bench` (see README)."""
