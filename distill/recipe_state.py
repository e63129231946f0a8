"""What a recipe's stages have done: each stage's state file (`<work_dir>/.recipe/<stage>.json`).

A state file holds the stage's fingerprint, whether it finished, and what it made: a changed
stage removes only that, and anything else in the way of its output stops it before it starts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from distill.recipe import OUTPUT_KEYS, Recipe, Stage
from synth.errors import ConfigError
from synth.layout import side_paths, write_text_atomic


class Made(BaseModel):
    """A path a stage made, so a later run may remove it."""

    path: str
    #: An empty folder that was there before the stage: only what is inside is the stage's.
    kept: bool = False
    #: The files a finished stage left in a folder (relative); None while it runs.
    files: list[str] | None = None


class StageState(BaseModel):
    """A stage's state file (`<work_dir>/.recipe/<stage>.json`)."""

    fingerprint: str
    status: Literal["running", "done"]
    #: None in state files of versions before it was recorded (see `made_before`).
    made: list[Made] | None = None
    argv: list[str] = []


def read_state(recipe: Recipe, stage: Stage) -> StageState | None:
    """The stage's recorded state, or None before its first run; a damaged file is an error naming it."""
    path = recipe.state_path(stage)
    if not path.is_file():
        return None
    try:
        return StageState.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a stage state"
        raise ConfigError(
            f"{path}: damaged recipe state ({why}); delete it and move away what stage '{stage.name}' wrote "
            f"({stage.output}), then rerun"
        ) from None


def status(recipe: Recipe, stage: Stage) -> str:
    """'done' (same fingerprint, output present), 'interrupted' (same fingerprint, not finished) or 'todo'."""
    state = read_state(recipe, stage)
    if state is None or state.fingerprint != stage.fingerprint:
        return "todo"
    if state.status == "done" and (stage.output is None or stage.output.exists()):
        return "done"
    return "interrupted"


#: What commands write beside their output: `out.jsonl` → `out.rejects.jsonl`, `out.work/`, ...
def stage_paths(stage: Stage) -> list[Path]:
    """Where the stage writes: its output, the output's journal, and the files its command puts beside it."""
    return [] if stage.output is None else side_paths(stage.output)


def clear_outputs(recipe: Recipe, stage: Stage) -> list[Made]:
    """Make way for a stage that starts over: remove what its earlier runs made; anything else in its
    way is an error naming it. Every path is checked before any is removed.

    Returns what the stage is about to make, for its state file: the paths absent now, and the
    empty folders it will fill.
    """
    state = read_state(recipe, stage)
    made = made_before(state, stage)
    doomed = []
    for path in stage_paths(stage):
        if not os.path.lexists(path):
            continue
        record = made.get(str(path))
        if record is None:
            if _empty_dir(path):
                continue
            raise ConfigError(_in_the_way(stage, path))
        stray = _stray(path, record)
        if stray is not None:
            raise ConfigError(
                f"stage '{stage.name}': {stray} lies in {path}, which the stage made, but the stage did not write it; "
                "move it away so the stage can start over"
            )
        doomed.append((path, record))
    for path, record in doomed:
        _remove(path, record.kept)
    return [Made(path=str(p), kept=os.path.lexists(p)) for p in stage_paths(stage) if not os.path.lexists(p) or _empty_dir(p)]


def made_before(state: StageState | None, stage: Stage) -> dict[str, Made]:
    """What the stage's earlier runs made, by path.

    A state file from before `made` was recorded still proves that this recipe ran this stage
    into this output: the paths where that stage writes count as its own, so an upgrade does
    not stop every changed stage of an existing run.
    """
    if state is None:
        return {}
    if state.made is not None:
        return {m.path: m for m in state.made}
    if stage.output is not None and str(stage.output) in state.argv:
        return {str(p): Made(path=str(p)) for p in stage_paths(stage)}
    return {}


def finished(made: list[Made]) -> list[Made]:
    """What a finished stage made: the paths now there, each folder with the files in it."""
    return [
        m.model_copy(update={"files": _listing(Path(m.path)) if _real_dir(Path(m.path)) else None})
        for m in made
        if os.path.lexists(m.path)
    ]


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _empty_dir(path: Path) -> bool:
    return _real_dir(path) and not any(path.iterdir())


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not _real_dir(p))


def _stray(path: Path, record: Made) -> Path | None:
    """A file in a folder the stage made that the finished stage did not leave there."""
    if not _real_dir(path) or record.files is None:
        return None
    known = set(record.files)
    return next((path / f for f in _listing(path) if f not in known), None)


def _in_the_way(stage: Stage, path: Path) -> str:
    key = next((k for k in OUTPUT_KEYS if k in stage.settings), "output")
    shown = path
    if _real_dir(path):
        shown = next((p for p in path.rglob("*") if not _real_dir(p)), None) or next(path.iterdir())
    return (
        f"stage '{stage.name}': {shown} is in the way of its output ({key}: {stage.output}) and this recipe did not "
        f"make it (a run removes only what it made); move it away, or choose another {key}"
    )


def _remove(path: Path, kept: bool) -> None:
    """Remove a path a stage made; of a folder that was there before it, only what is inside."""
    if not _real_dir(path):
        path.unlink()
    elif not kept:
        shutil.rmtree(path)
    else:
        for child in path.iterdir():
            _remove(child, kept=False)


def mark(recipe: Recipe, stage: Stage, state: str, made: list[Made]) -> None:
    """Record the stage's fingerprint, state ('running' or 'done') and what it made."""
    from synth.redact import redact_all

    argv = redact_all(stage.argv)  # a stage's own teacher/judge flags may carry credentials
    write_text_atomic(recipe.state_path(stage), json.dumps({"fingerprint": stage.fingerprint, "status": state, "argv": argv,
                                                            "time": time.time(), "made": [m.model_dump(exclude_none=True) for m in made]}, indent=2))
