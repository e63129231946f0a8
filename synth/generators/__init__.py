"""Generators: each turns one input into chat messages and one response into records or rejects."""
