"""The meta-information behind curation: a taxonomy file (or a grown tree) and the cells it spans.

A taxonomy is topics (nested subtopics, optional knowledge points on the leaves),
task types and difficulty levels. A cell is one (leaf topic, task type,
difficulty[, knowledge point]) combination; each cell asks the teacher for
questions written to that specification.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from synth import safe_yaml
from synth.errors import ConfigError, describe_validation_error
from synth.layout import write_text_atomic
from synth.paths import resource_dir
from synth.records import stable_id


def _labeled(value: Any) -> Any:
    """A bare string is shorthand for `{name: string}`."""
    return {"name": value} if isinstance(value, str) else value


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        key = normalize_name(name)
        if key in seen:
            raise ValueError(f"two {what} are both named {name!r}")
        seen.add(key)


def normalize_name(name: str) -> str:
    """The form sibling names are compared in: case-folded, spaces collapsed, outer punctuation dropped."""
    return " ".join(name.casefold().split()).strip(" .,;:!?-*#\"'`。，；：！？")


class Labeled(BaseModel):
    """A task type or difficulty level: a name and an optional description for the teacher."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Short name, shown to the teacher and kept in each record's meta.")
    description: str | None = Field(None, description="What it means, shown to the teacher.")


class Topic(BaseModel):
    """A topic: a leaf, or a parent of subtopics. Knowledge points belong on leaves."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Topic name; sibling names must differ.")
    description: str | None = Field(None, description="What the topic covers, shown to the teacher.")
    subtopics: list[Topic] = Field(default_factory=list, description="Narrower topics; a topic without any is a leaf.")
    knowledge_points: list[str] = Field(default_factory=list, description="Leaf only: one cell per knowledge point.")

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @model_validator(mode="after")
    def _check(self) -> "Topic":
        if self.subtopics and self.knowledge_points:
            raise ValueError(f"topic {self.name!r} has subtopics, so its knowledge_points belong on its leaf subtopics")
        _unique([t.name for t in self.subtopics], f"subtopics of {self.name!r}")
        _unique(self.knowledge_points, f"knowledge points of {self.name!r}")
        return self

    def leaves(self, parent: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], "Topic"]]:
        """(path, topic) for every leaf under this topic, depth first in file order."""
        path = (*parent, self.name)
        if not self.subtopics:
            yield path, self
        for sub in self.subtopics:
            yield from sub.leaves(path)


class Taxonomy(BaseModel):
    """The whole meta-information file."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="A name for the taxonomy.")
    description: str | None = Field(None, description="What the taxonomy is for.")
    topics: list[Topic] = Field(min_length=1, description="Top-level topics.")
    task_types: list[Labeled] = Field(min_length=1, description="Kinds of task (a string or {name, description}).")
    difficulty_levels: list[Labeled] = Field(min_length=1, description="Difficulty levels (a string or {name, description}).")

    @field_validator("task_types", "difficulty_levels", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return [_labeled(x) for x in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check(self) -> "Taxonomy":
        _unique([t.name for t in self.topics], "top-level topics")
        _unique([t.name for t in self.task_types], "task types")
        _unique([d.name for d in self.difficulty_levels], "difficulty levels")
        return self


def find_taxonomy(name: str | Path) -> Path:
    """A taxonomy path, or the name of one shipped in data/taxonomies (e.g. `math_en`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = resource_dir("data") / "taxonomies"
    candidate = shipped / f"{path.name}.yaml"
    if path.suffix == "" and len(path.parts) == 1 and candidate.is_file():
        return candidate
    names = ", ".join(sorted(p.stem for p in shipped.glob("*.yaml"))) or "none"
    raise ConfigError(f"{path}: taxonomy file not found (shipped taxonomies: {names})")


def load_taxonomy(name: str | Path) -> Taxonomy:
    """Read and validate a taxonomy YAML; every error names the file and the key."""
    path = find_taxonomy(name)
    try:
        data = safe_yaml.load(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the taxonomy: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with topics, task_types and difficulty_levels")
    try:
        return Taxonomy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc, 'key')}") from None


@dataclass(frozen=True)
class Cell:
    """One combination of meta-information; its id is a stable hash of the combination."""

    topic: tuple[str, ...]
    task_type: Labeled
    difficulty: Labeled
    knowledge_point: str | None = None
    topic_description: str | None = None

    @property
    def id(self) -> str:
        """Stable id of the combination (names only: descriptions may be reworded)."""
        return stable_id(list(self.topic), self.task_type.name, self.difficulty.name, self.knowledge_point)

    @property
    def label(self) -> str:
        """`Algebra > Linear equations | word problem | easy | kp` for tables and error messages."""
        parts = [" > ".join(self.topic), self.task_type.name, self.difficulty.name]
        return " | ".join(parts + ([self.knowledge_point] if self.knowledge_point else []))


def all_cells(taxonomy: Taxonomy, knowledge_points: bool = True) -> list[Cell]:
    """The full cross product, in file order: leaf, knowledge point, task type, difficulty."""
    cells = []
    for top in taxonomy.topics:
        for path, leaf in top.leaves():
            points = (leaf.knowledge_points if knowledge_points else []) or [None]
            for point, task, level in itertools.product(points, taxonomy.task_types, taxonomy.difficulty_levels):
                cells.append(Cell(path, task, level, point, leaf.description))
    return cells


def sample_cells(cells: list[Cell], max_cells: int | None, seed: int) -> list[Cell]:
    """At most `max_cells` of `cells`, chosen by `seed` and kept in their original order."""
    if max_cells is None or max_cells >= len(cells):
        return list(cells)
    picked = sorted(random.Random(seed).sample(range(len(cells)), max_cells))
    return [cells[i] for i in picked]


def taxonomy_from_tree(
    root: str, children: dict[tuple[str, ...], list[str]], task_types: list[str], difficulties: list[str], description: str
) -> Taxonomy:
    """A taxonomy from a grown tree: `children` maps each expanded topic path to its subtopic names."""

    def node(path: tuple[str, ...]) -> Topic:
        return Topic(name=path[-1], subtopics=[node((*path, c)) for c in children.get(path, [])])

    return Taxonomy(
        name=root,
        description=description,
        topics=[node((root,))],
        task_types=[Labeled(name=t) for t in task_types],
        difficulty_levels=[Labeled(name=d) for d in difficulties],
    )


def write_taxonomy(taxonomy: Taxonomy, path: str | Path) -> Path:
    """Write a taxonomy as YAML (atomically) in the form load_taxonomy reads back."""
    path = Path(path)
    # Empty subtopic and knowledge-point lists are left out: the file stays short to edit.
    data = taxonomy.model_dump(exclude_none=True, exclude_defaults=True)
    return write_text_atomic(path, yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
