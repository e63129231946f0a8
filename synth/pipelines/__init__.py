"""Multi-stage methods: one module each, with a settings model and `run(settings)`; shared plumbing in `stages`."""
