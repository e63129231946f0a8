"""Filters over generated text: exact and near-duplicate removal, refusals, answer checks."""
