"""Feedback: inputs, candidates and the judge loop (`base`), the judging modes (`rate`, `pairwise`, `critique`) and self-knowledge's scoring (`self_knowledge`)."""
