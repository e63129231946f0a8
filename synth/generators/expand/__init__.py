"""Expansion: Self-Instruct's proposer (`self_instruct`), Evol-Instruct's evolver and equivalence judge (`evol`), and the answer stage both end with (`answer`)."""
