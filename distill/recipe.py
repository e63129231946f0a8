"""Recipes: an ordered list of `distill` commands whose outputs feed each other by name.

A stage is `{name, command, ...settings}`; its settings are the command's flags with
underscores (`max_steps: 20` is `--max-steps 20`), so a recipe maps one-to-one onto
the CLI and its configs. `@name` is the output of stage `name`. Each stage is
fingerprinted (its arguments, the content of its inputs, the code of its command);
a rerun skips stages whose fingerprint is unchanged and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from synth.errors import ConfigError

OUTPUT_KEYS = ("output", "output_dir", "out")
TOP_LEVEL = {"name", "description", "teacher", "vars", "work_dir", "stages"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# `@name`, or `hf:@name` where a flag takes a teacher spec (a stage's model served as a teacher).
_REF = re.compile(r"^(hf:)?@(.+)$")
_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """One step of a recipe, its command line and where its output goes."""

    name: str
    command: list[str]
    settings: dict[str, Any]
    argv: list[str]
    output: Path | None
    depends: list[str]
    fingerprint: str = ""


@dataclass
class Recipe:
    """A loaded, validated recipe."""

    path: Path
    name: str
    work_dir: Path
    stages: list[Stage]

    def state_path(self, stage: Stage) -> Path:
        """Where the stage's fingerprint and status are kept."""
        return self.work_dir / ".recipe" / f"{stage.name}.json"


def _apply_overrides(stages: list, overrides: dict[str, dict[str, Any]], path: Path) -> list:
    """The stage list with `--set` values put in; naming a stage the recipe lacks is an error."""
    names = [str(e.get("name")) for e in stages if isinstance(e, dict)]
    for stage in overrides:
        if stage not in names:
            raise ConfigError(f"{path}: --set {stage}.…: no stage '{stage}' (stages: {', '.join(names)})")
    return [{**e, **overrides.get(str(e.get("name")), {})} if isinstance(e, dict) else e for e in stages]


def parse_assignments(items: list[str], flag: str, dotted: bool) -> dict:
    """`NAME=VALUE` (or `STAGE.KEY=VALUE` when dotted) strings as a dict; values are read as YAML scalars."""
    out: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or (dotted and "." not in name):
            shape = "STAGE.KEY=VALUE" if dotted else "NAME=VALUE"
            raise ConfigError(f"{flag} {item!r}: expected {shape}")
        if dotted:
            stage, key = name.split(".", 1)
            out.setdefault(stage, {})[key] = yaml.safe_load(value) if value else ""
        else:
            out[name] = value
    return out


def expand_vars(text: str, variables: dict[str, str], where: Path) -> str:
    """Replace ${VAR} from the recipe's vars, then the environment; an unknown one is an error."""

    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key in variables:
            return str(variables[key])
        if key in os.environ:
            return os.environ[key]
        raise ConfigError(f"{where}: ${{{key}}} is not set (not in the recipe's vars nor the environment)")

    return _VAR.sub(sub, text)


def load_recipe(path: str | Path, variables: dict[str, str] | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Recipe:
    """Read, expand and validate a recipe: every key of every stage must be a flag of its command.

    `variables` replace the recipe's vars (`--var NAME=VALUE`); `overrides` replace or add stage
    keys (`--set STAGE.KEY=VALUE`), checked like the recipe's own keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    raw = _yaml(path.read_text(encoding="utf-8"), path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with a 'stages' list")
    given = {k: str(v) for k, v in (raw.get("vars") or {}).items()}
    given = {k: expand_vars(v, {}, path) for k, v in given.items()}
    data = _yaml(expand_vars(path.read_text(encoding="utf-8"), {**given, **(variables or {})}, path), path) or {}
    unknown = set(data) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{sorted(unknown)[0]}' (known: {', '.join(sorted(TOP_LEVEL))})")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    stages_raw = _apply_overrides(stages_raw, overrides or {}, path)
    name = str(data.get("name") or path.stem)
    work_dir = Path(data.get("work_dir") or f"out/{name}")
    teacher_arg = _teacher_arg(data.get("teacher"), work_dir, path)

    from distill.cli import build_parser

    parser = build_parser()
    stages: list[Stage] = []
    outputs: dict[str, Path | None] = {}
    for i, entry in enumerate(stages_raw):
        if not isinstance(entry, dict) or "name" not in entry or "command" not in entry:
            raise ConfigError(f"{path}: stage {i + 1} needs a 'name' and a 'command'")
        stage_name, command = str(entry["name"]), str(entry["command"]).split()
        if stage_name in outputs:
            raise ConfigError(f"{path}: two stages are named '{stage_name}'")
        settings = {k: v for k, v in entry.items() if k not in ("name", "command")}
        sub = _subparser(parser, command, stage_name, path)
        flags = _flags_of(sub)
        if "teacher" in flags and "teacher" not in settings and teacher_arg is not None:
            settings["teacher"] = teacher_arg
        depends = sorted({m.group(2) for v in settings.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str) and (m := _REF.match(r))})
        settings = {k: _resolve_refs(v, outputs, stage_name, path) for k, v in settings.items()}
        argv = list(command)
        for key, value in settings.items():
            if key not in flags:
                raise ConfigError(f"{path}: stage '{stage_name}' ({' '.join(command)}): unknown key '{key}'")
            argv += _to_argv(flags[key], value)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):  # argparse's usage text would bury the one line that matters
                sub.parse_args(argv[len(command):])
        except SystemExit:
            why = (err.getvalue().strip().splitlines() or [""])[-1].split(": error: ")[-1]
            why = re.sub(r"argument --([\w-]+)(/-\w+)?", lambda m: f"key '{m.group(1).replace('-', '_')}'", why)
            raise ConfigError(f"{path}: stage '{stage_name}': {why} (as `distill {' '.join(argv)}`)") from None
        output = next((Path(str(settings[k])) for k in OUTPUT_KEYS if k in settings), None)
        outputs[stage_name] = output
        stages.append(Stage(stage_name, command, settings, argv, output, depends))
    return Recipe(path=path, name=name, work_dir=work_dir, stages=stages)


def _yaml(text: str, path: Path) -> Any:
    """Parse YAML; a syntax error names file:line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None


def _teacher_arg(block: Any, work_dir: Path, path: Path) -> str | None:
    """The recipe's teacher as a --teacher value: a spec string, or a mapping written to a YAML file.

    Stage command lines are printed and saved, and the mapping is saved as `.recipe/teacher.yaml`:
    a base URL's credentials (`user:pass@`, `?api_key=`) are masked in both, and the real URL is
    kept in this process's memory only (`synth.redact.remember`). The stages run in this process,
    and the openai backend puts the credentials back when it connects; the saved file alone,
    read by another process, fails with a message instead of sending the mask.
    """
    from synth.redact import redact, remember
    from synth.teachers.config import TeacherConfig, parse_teacher_spec

    if block is None:
        return None
    if isinstance(block, str):
        config = parse_teacher_spec(block) if block.startswith("openai:") else None
        if config is None or not config.base_url:
            return block
        return f"openai:{config.model}@{remember(config.base_url)}"
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: 'teacher' is a spec string or a mapping of teacher settings")
    try:
        TeacherConfig.model_validate(block)
    except Exception as exc:  # pydantic's ValidationError, named for the user
        from synth.errors import describe_validation_error

        raise ConfigError(redact(f"{path}: teacher: {describe_validation_error(exc, 'key')}")) from None
    saved = dict(block)
    if saved.get("base_url"):
        saved["base_url"] = remember(saved["base_url"])
    if saved.get("api_key_env"):  # a key pasted where its variable's name belongs
        saved["api_key_env"] = redact(saved["api_key_env"])
    target = work_dir / ".recipe" / "teacher.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(saved, sort_keys=True), encoding="utf-8")
    return str(target)


def _subparser(parser: argparse.ArgumentParser, command: list[str], stage: str, path: Path) -> argparse.ArgumentParser:
    current = parser
    for word in command:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            raise ConfigError(f"{path}: stage '{stage}': unknown command 'distill {' '.join(command)}'")
        current = actions[0].choices[word]
    if any(isinstance(a, argparse._SubParsersAction) for a in current._actions):
        raise ConfigError(f"{path}: stage '{stage}': 'distill {' '.join(command)}' needs a subcommand")
    return current


def _flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Recipe keys a command accepts: each flag's long name with underscores (`--max-steps` → max_steps), and its dest."""
    keys = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        keys[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--"):
                keys[flag[2:].replace("-", "_")] = action
    return keys


def _resolve_refs(value: Any, outputs: dict[str, Path | None], stage: str, path: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_refs(v, outputs, stage, path) for v in value]
    match = _REF.match(value) if isinstance(value, str) else None
    if match:
        prefix, ref = match.groups()
        if ref not in outputs:
            raise ConfigError(f"{path}: stage '{stage}': '@{ref}' names no earlier stage")
        if outputs[ref] is None:
            raise ConfigError(f"{path}: stage '{stage}': stage '{ref}' has no output to use")
        return (prefix or "") + str(outputs[ref])
    return value


def _to_argv(action: argparse.Action, value: Any) -> list[str]:
    flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true / store_const
        return [flag] if value else []
    values = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._AppendAction):
        return [x for v in values for x in (flag, str(v))]
    return [flag, *map(str, values)]


def fingerprint(stage: Stage) -> str:
    """Hash of the stage's arguments, the content of the files it reads and the code of its command."""
    h = hashlib.sha256(json.dumps(stage.argv).encode())
    for key, value in sorted(stage.settings.items()):
        if key in OUTPUT_KEYS:
            continue
        for item in value if isinstance(value, list) else [value]:
            p = Path(str(item).removeprefix("hf:"))  # a model served as a teacher counts by its files
            # "" is Path("."): an empty setting (reference_field: "") must not hash the working directory.
            if isinstance(item, str) and item.strip() not in ("", ".") and p.exists():
                h.update(key.encode() + _content_hash(p).encode())
    for source in _code_files(stage.command, stage.settings):
        h.update(source.read_bytes())
    return h.hexdigest()[:24]


def _content_hash(path: Path) -> str:
    """Files by content; directories (models) by names, sizes and modification times."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    else:
        for f in sorted(p for p in path.rglob("*") if p.is_file() and "checkpoint-" not in str(p)):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


_COMMAND_MODULES = {"self": "self_knowledge"}
# Code a command runs beyond its own module and generators (paths from the repository root).
_SHARED_CODE = {
    "generate": ["synth/generators/raw.py"],
    "eval": ["trainers/evaluate.py", "trainers/eval_metrics.py", "trainers/report.py", "synth/filters/verify.py"],
    "label": ["synth/filters/verify.py"],
    "expand": ["synth/filters/dedup.py", "synth/filters/lsh.py", "synth/filters/shingles.py"],
    "student": ["trainers/student.py"],
    "train": ["trainers/common.py", "trainers/config.py"],
}
_TRAINER_CODE = {"ppo": ["rl_common"], "grpo": ["rl_common"], "rloo": ["rl_common", "grpo"], "kd": ["sft"], "gkd": ["sft"]}
# A command's templates are prompts/<command>/; eval renders labeling's.
_PROMPT_DIRS = {"eval": "label"}


def _code_files(command: list[str], settings: dict[str, Any] | None = None) -> list[Path]:
    """The code and templates a stage runs: its command module, method modules, shared helpers, prompt templates."""
    # `distill self` lives in self_knowledge.py (`self` is a poor module name).
    module = _COMMAND_MODULES.get(command[0], command[0].replace("-", "_"))
    files = [_ROOT / "distill" / "commands" / f"{module}.py"]
    files += [_ROOT / f for f in _SHARED_CODE.get(command[0], [])]
    if command[0] == "train" and len(command) > 1:
        files += sorted((_ROOT / "trainers").glob(f"{command[1]}*.py"))
        files += [_ROOT / "trainers" / f"{m}.py" for m in _TRAINER_CODE.get(command[1], [])]
    files += sorted((_ROOT / "synth" / "generators").glob(f"{module}*.py"))
    files += sorted((_ROOT / "prompts" / _PROMPT_DIRS.get(command[0], command[0])).glob("*.jinja"))
    template = (settings or {}).get("template")
    if isinstance(template, str) and "/" in template and not template.endswith(".jinja"):
        files += sorted((_ROOT / "prompts").glob(f"{template}.*.jinja"))  # a named template, e.g. label/cot
    return list(dict.fromkeys(f for f in files if f.is_file()))


def status(recipe: Recipe, stage: Stage) -> str:
    """'done' (same fingerprint, output present), 'interrupted' (same fingerprint, not finished) or 'todo'."""
    state_file = recipe.state_path(stage)
    if not state_file.is_file():
        return "todo"
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != stage.fingerprint:
        return "todo"
    if state.get("status") == "done" and (stage.output is None or stage.output.exists()):
        return "done"
    return "interrupted"


def clear_outputs(stage: Stage) -> None:
    """Remove what an older version of the stage wrote, so a changed stage starts clean."""
    if stage.output is None:
        return
    out = stage.output
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    siblings = [".rejects.jsonl", ".work", ".sft.jsonl", ".pairs.jsonl", ".coverage.json", ".coverage.md"]
    for p in (out, out.with_name(out.name + ".partial"), *(out.with_name(stem + s) for s in siblings)):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def mark(recipe: Recipe, stage: Stage, state: str) -> None:
    """Record the stage's fingerprint and state ('running' or 'done')."""
    target = recipe.state_path(stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    from synth.redact import redact_all

    argv = redact_all(stage.argv)  # a stage's own teacher/judge flags may carry credentials
    tmp.write_text(json.dumps({"fingerprint": stage.fingerprint, "status": state, "argv": argv, "time": time.time()}, indent=2))
    os.replace(tmp, target)
