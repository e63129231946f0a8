"""Finds and renders the Jinja templates in prompts/, in a sandbox so seed data cannot run code."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from synth.errors import ConfigError, InputError
from synth.paths import resource_dir

_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


@dataclass(frozen=True)
class PromptTemplate:
    """A template's name, source and content hash (the hash goes into provenance and record ids)."""

    name: str
    source: str
    path: Path

    @property
    def hash(self) -> str:
        """Short sha256 of the source: editing a template changes the records it makes."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def render(self, where: str = "", **variables: Any) -> str:
        """Fill the template; a missing variable is an InputError naming `where` (file:line) and the variable."""
        try:
            return _ENV.from_string(self.source).render(**variables).strip()
        except UndefinedError as exc:
            prefix = f"{where}: " if where else ""
            raise InputError(f"{prefix}template {self.name}: {exc.message}") from None
        except SecurityError as exc:
            # The sandbox refused something (a dunder, a Python call): the template's fault, said in one line.
            raise ConfigError(f"template {self.name}: refused by the sandbox: {exc}") from None


def load_template(name: str, lang: str = "en") -> PromptTemplate:
    """Load `method/name` from prompts/ in language `lang` (e.g. label/cot → prompts/label/cot.en.jinja), or a .jinja path."""
    if name.endswith(".jinja"):
        path = Path(name)
    else:
        path = resource_dir("prompts") / f"{name}.{lang}.jinja"
    if not path.is_file():
        available = sorted(
            str(p.relative_to(resource_dir("prompts"))).rsplit(".", 2)[0]
            for p in resource_dir("prompts").rglob(f"*.{lang}.jinja")
        )
        raise ConfigError(f"template {name!r} (language {lang}) not found at {path}; available: {', '.join(available) or 'none'}")
    source = path.read_text(encoding="utf-8")
    try:
        _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
    return PromptTemplate(name=name, source=source, path=path)
