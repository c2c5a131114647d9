"""care-scale."""
