"""Filters over generated text: exact and near-duplicate removal, and the like."""
