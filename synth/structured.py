"""Pulling a JSON object out of a teacher's reply and validating it into a pydantic model."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from synth.errors import describe_validation_error

M = TypeVar("M", bound=BaseModel)

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The first JSON value in `text`: the whole text, a ```json fence, or the first balanced {...} / [...].

    Raises ValueError when there is none.
    """
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for block in _FENCE.findall(text):
        try:
            return json.loads(block)
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return decoder.raw_decode(text, i)[0]
            except ValueError:
                continue
    raise ValueError("no JSON found in the reply")


def parse_model(text: str, model: type[M]) -> tuple[M | None, str | None]:
    """(the validated model, None) or (None, why not) for one reply."""
    try:
        value = extract_json(text)
    except ValueError as exc:
        return None, str(exc)
    try:
        return model.model_validate(value), None
    except ValidationError as exc:
        return None, f"JSON does not fit {model.__name__}: {describe_validation_error(exc)}"
