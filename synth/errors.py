"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class DistillError(Exception):
    """Base of every error meant for the user rather than for a traceback."""


class InputError(DistillError):
    """Bad input data: the message names file:line and the field."""


class ConfigError(DistillError):
    """A bad config, recipe, flag or teacher spec."""


class DryRun(DistillError):
    """--dry-run: the estimate is printed and nothing was sent (exit code 0)."""


def describe_validation_error(exc, noun: str = "field") -> str:
    """A pydantic ValidationError as `field 'a.b': message; field 'c': message`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown " + noun if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        parts.append(f"{noun} '{loc}': {msg}" if loc else msg)
    return "; ".join(parts)
