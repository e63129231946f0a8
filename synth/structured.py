"""Pulling a JSON object out of a teacher's reply and validating it into a pydantic model, leniently for list replies."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

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


class ListReply(BaseModel):
    """A reply that is a list under one key (`{"<list_key>": [...]}`), read leniently.

    Teachers drop the wrapper (a bare list is the list) or name the key otherwise (the list under
    one of `list_aliases`, in order, stands for it); `list_items` normalises the items (strings or
    objects wrapping them, say) before the field validates them.
    """

    model_config = ConfigDict(extra="ignore")

    #: The key the list sits under.
    list_key: ClassVar[str]
    #: Other keys a teacher puts the list under.
    list_aliases: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def list_items(cls, items: list[Any]) -> list[Any]:
        """The items as the list field takes them; as given by default."""
        return items

    @model_validator(mode="before")
    @classmethod
    def _lenient(cls, value: Any) -> Any:
        if isinstance(value, list):
            value = {cls.list_key: value}
        elif isinstance(value, dict) and cls.list_key not in value:
            alias = next((a for a in cls.list_aliases if isinstance(value.get(a), list)), None)
            if alias is not None:
                value = {**value, cls.list_key: value[alias]}
        if isinstance(value, dict) and isinstance(value.get(cls.list_key), list):
            value = {**value, cls.list_key: cls.list_items(value[cls.list_key])}
        return value
