"""Never delete or overwrite what the run did not make (issue #12).

`distill run` removes only what its stages made; `--output` never replaces a user's file,
a device, a directory or the job's own input; a journal another job left is refused, not
merged; a disk that fills up mid-job loses no paid answer; damaged state files and odd
recipes are one line naming the file. Every case runs against tests/fault_server.py and
checks that nothing was asked of the teacher when it must not be.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from distill.cli import main as distill_main
from synth.teachers.cache import ResponseCache
from synth.journal import TaskJournal
from tests.fault_server import FaultServer
from tests.reliability.harness import write_prompts

USER_LINE = '{"prompt": "my own data, not an output"}\n'


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


def _teacher(server: FaultServer, model: str = "echo") -> str:
    return f"openai:{model}@{server.base_url}"


def _generate(server, inp: Path, out: Path, cache: Path, *extra: str, model: str = "echo") -> list[str]:
    return ["generate", "--teacher", _teacher(server, model), "--input", str(inp), "--output", str(out),
            "--cache-dir", str(cache), "--quiet", "--seed", "1", *extra]


def _error(capsys) -> str:
    """The one error line a refused command printed (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- distill run: a stage removes only what it made ------------------------------------------------


def _recipe(tmp_path: Path, server: FaultServer, stages: str) -> Path:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: hostile
work_dir: {tmp_path}/run
teacher: openai:echo@{server.base_url}
stages:
  - name: answers
    command: generate
    input: {prompts}
    output: {tmp_path}/run/data/answers.jsonl
    max_tokens: 16
    quiet: true
{stages}""")
    return recipe


def test_run_over_a_folder_holding_a_users_file_keeps_it_and_runs_nothing(tmp_path, server, cache_dir, capsys):
    folder = tmp_path / "run" / "data"
    folder.mkdir(parents=True)
    mine = folder / "answers.jsonl"
    mine.write_text(USER_LINE)
    recipe = _recipe(tmp_path, server, "")
    assert distill_main(["run", str(recipe)]) == 1
    line = _error(capsys)
    assert str(mine) in line and "did not make" in line
    assert mine.read_text() == USER_LINE, "the user's file is untouched"
    assert server.received == 0, "the stage did not run"
    assert not (tmp_path / "run/.recipe/answers.json").exists()


def test_a_later_stage_whose_folder_holds_an_earlier_stages_output_stops(tmp_path, server, cache_dir, capsys):
    later = f"""  - name: sft
    command: train sft
    model: {tmp_path}/no-model
    data: "@answers"
    output_dir: {tmp_path}/run/data
"""
    recipe = _recipe(tmp_path, server, later)
    assert distill_main(["run", str(recipe)]) == 1
    line = _error(capsys)
    answers = tmp_path / "run/data/answers.jsonl"
    assert "stage 'sft'" in line and str(tmp_path / "run/data") in line
    assert answers.is_file() and len(answers.read_text().splitlines()) == 6, "the earlier stage's output is kept"


def test_a_user_folder_inside_the_way_of_a_directory_output_is_kept(tmp_path, server, cache_dir, capsys):
    student = tmp_path / "run" / "student"
    student.mkdir(parents=True)
    (student / "notes.txt").write_text("mine")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"work_dir: {tmp_path}/run\nstages:\n  - name: student\n    command: student derive\n"
                      f"    keep: 0.5\n    out: {student}\n")
    assert distill_main(["run", str(recipe)]) == 1
    assert str(student / "notes.txt") in _error(capsys)
    assert (student / "notes.txt").read_text() == "mine"


def test_a_changed_stage_starts_over_removing_only_its_own_outputs(tmp_path, server, cache_dir, capsys):
    empty = tmp_path / "run" / "data"
    empty.mkdir(parents=True)  # an empty folder is fine to write into
    recipe = _recipe(tmp_path, server, "")
    assert distill_main(["run", str(recipe)]) == 0
    assert server.received == 6
    assert distill_main(["run", str(recipe), "--set", "answers.max_tokens=17"]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert server.received == 12, "the changed stage ran again, into what it had made"
    state = json.loads((tmp_path / "run/.recipe/answers.json").read_text())
    assert str(empty / "answers.jsonl") in [m["path"] for m in state["made"]]


def test_a_stray_file_in_a_folder_the_stage_made_is_not_removed(tmp_path):
    from distill.recipe import Recipe, Stage
    from distill.recipe_state import Made, clear_outputs, finished, mark

    out = tmp_path / "model"
    stage = Stage("train", ["train", "sft"], {"output_dir": str(out)}, [], out, [], fingerprint="a")
    recipe = Recipe(tmp_path / "r.yaml", "r", tmp_path / "run", [stage])
    made = clear_outputs(recipe, stage)
    out.mkdir()
    (out / "config.json").write_text("{}")
    mark(recipe, stage, "done", finished(made))
    (out / "mine.txt").write_text("added later by the user")
    with pytest.raises(Exception, match="mine.txt"):
        clear_outputs(recipe, stage)
    assert (out / "mine.txt").exists() and (out / "config.json").exists()
    (out / "mine.txt").unlink()
    assert Made(path=str(out)) in clear_outputs(recipe, stage) and not out.exists(), "its own folder is removed"
    out.mkdir()
    fresh = Recipe(tmp_path / "r.yaml", "r", tmp_path / "other-run", [stage])
    assert Made(path=str(out), kept=True) in clear_outputs(fresh, stage), "a user's empty folder is used, and kept"


@pytest.mark.parametrize("same_output", [True, False], ids=["its-own-output", "another-output"])
def test_a_state_file_from_before_made_was_recorded(same_output, tmp_path, server, cache_dir, capsys):
    # An earlier version's state file names the stage's output in its argv: that output is the
    # stage's own, so upgrading does not stop every changed stage; naming another proves nothing.
    recipe = _recipe(tmp_path, server, "")
    assert distill_main(["run", str(recipe)]) == 0
    state_file = tmp_path / "run/.recipe/answers.json"
    state = json.loads(state_file.read_text())
    argv = state["argv"] if same_output else [a.replace("answers.jsonl", "elsewhere.jsonl") for a in state["argv"]]
    state_file.write_text(json.dumps({"fingerprint": "from-an-older-version", "status": "done", "argv": argv, "time": 0}))
    capsys.readouterr()
    code = distill_main(["run", str(recipe)])
    if same_output:
        assert code == 0 and "skipped" not in capsys.readouterr().out, "the stage ran again over its own output"
        assert (tmp_path / "run/data/answers.jsonl").is_file() and server.received == 6, "its answers came from the cache"
        assert json.loads(state_file.read_text())["made"], "and now records what it made"
    else:
        assert code == 1 and "in the way" in _error(capsys) and server.received == 6


def test_an_interrupted_stage_resumes_over_its_own_partial_outputs(tmp_path, server, cache_dir, capsys):
    recipe = _recipe(tmp_path, server, "")
    assert distill_main(["run", str(recipe)]) == 0
    state_file = tmp_path / "run/.recipe/answers.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "status": "running"}))  # as if killed before it finished
    assert distill_main(["run", str(recipe)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert server.received == 6


# -- --output: never a user's file, a device, a directory or the input itself --------------------


def _output_cases(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """(input, output) pairs that must be refused; the error names the second path, or the first for a clash with the input."""
    prompts = write_prompts(tmp_path / "data.jsonl", 4)
    mine = tmp_path / "mine.jsonl"
    mine.write_text(USER_LINE)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "afile").write_text("x")
    # A link to the device, not the device: code that wrongly renames over it replaces the link, never /dev/null.
    null = tmp_path / "null.jsonl"
    null.symlink_to("/dev/null")
    rejects = write_prompts(tmp_path / "x.rejects.jsonl", 4)
    partial = write_prompts(tmp_path / "y.jsonl.partial", 4)
    return {
        "users-file": (prompts, mine),
        "dev-null": (prompts, null),
        "fifo": (prompts, fifo),
        "directory": (prompts, tmp_path / "folder.jsonl"),
        "dash": (prompts, Path("-")),
        "parent-is-a-file": (prompts, tmp_path / "afile" / "out.jsonl"),
        "input-is-its-rejects": (rejects, tmp_path / "x.jsonl"),
        "input-is-its-journal": (partial, tmp_path / "y.jsonl"),
        "input-is-output": (prompts, prompts),
    }


OUTPUT_CASES = ["users-file", "dev-null", "fifo", "directory", "dash", "parent-is-a-file", "input-is-its-rejects",
                "input-is-its-journal", "input-is-output"]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_generate_refuses_an_output_it_must_not_write(case, tmp_path, server, capsys):
    inp, out = _output_cases(tmp_path)[case]
    before = inp.read_bytes()
    assert distill_main(_generate(server, inp, out, tmp_path / "cache")) == 1
    line = _error(capsys)
    assert str(inp if case.startswith("input-is") else out) in line or (case == "dash" and "'-'" in line), line
    assert server.received == 0, "refused before any request"
    assert inp.read_bytes() == before
    if case == "users-file":
        assert out.read_text() == USER_LINE


MULTI_STAGE = {
    "label": lambda t: ["label", "--teacher", t],
    "feedback": lambda t: ["feedback", "--teacher", t],
    "self": lambda t: ["self", "--student", t, "--judge-by", "consistency"],
    "expand-evol": lambda t: ["expand", "evol", "--teacher", t],
}


@pytest.mark.parametrize("command", list(MULTI_STAGE))
def test_multi_stage_commands_refuse_their_own_rejects_as_input(command, tmp_path, server, capsys):
    rejects = tmp_path / "data.rejects.jsonl"
    field = {"label": "question", "expand-evol": "instruction"}.get(command, "prompt")
    rejects.write_text("".join(json.dumps({field: f"q{i}"}) + "\n" for i in range(3)))
    before = rejects.read_bytes()
    args = [*MULTI_STAGE[command](_teacher(server)), "--input", str(rejects), "--output", str(tmp_path / "data.jsonl"),
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert distill_main(args) == 1
    assert str(rejects) in _error(capsys)
    assert server.received == 0 and rejects.read_bytes() == before


@pytest.mark.parametrize("command", ["curate", "expand-self-instruct"])
def test_multi_stage_commands_refuse_a_users_file_as_output(command, tmp_path, server, capsys):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(USER_LINE)
    args = ["curate", "--root-topic", "cooking"] if command == "curate" else ["expand", "self-instruct"]
    assert distill_main([*args, "--teacher", _teacher(server), "--output", str(mine), "--cache-dir", str(tmp_path / "cache")]) == 1
    assert str(mine) in _error(capsys)
    assert server.received == 0 and mine.read_text() == USER_LINE


@pytest.mark.parametrize("command,side", [("curate", "out.tree.yaml"), ("curate", "out.coverage.md"), ("expand-self-instruct", "out.work/instructions.jsonl")])
def test_multi_stage_commands_refuse_a_folder_where_a_side_file_goes(command, side, tmp_path, server, capsys):
    (tmp_path / side).mkdir(parents=True)
    args = ["curate", "--root-topic", "cooking"] if command == "curate" else ["expand", "self-instruct"]
    assert distill_main([*args, "--teacher", _teacher(server), "--output", str(tmp_path / "out.jsonl"), "--cache-dir", str(tmp_path / "cache")]) == 1
    assert f"{tmp_path / side}: is a directory" in _error(capsys)
    assert server.received == 0 and not (tmp_path / "out.jsonl").exists()


# -- a journal left by another job ------------------------------------------------------------------


def _fail_journal_after(monkeypatch, lines: int) -> None:
    """The journal's writes fail with 'No space left on device' after `lines` tasks."""
    real = TaskJournal.add
    count = {"n": 0}

    def add(self, task, records, rejects):
        count["n"] += 1
        if count["n"] > lines:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, task, records, rejects)

    monkeypatch.setattr(TaskJournal, "add", add)


def _leave_journal(server, inp, out, cache, lines=10) -> None:
    """Run job A until its disk 'fills up', leaving its journal behind."""
    with pytest.MonkeyPatch.context() as m:
        _fail_journal_after(m, lines)
        assert distill_main(_generate(server, inp, out, cache, "--concurrency", "4")) == 1
    assert out.with_name(out.name + ".partial").is_file() and not out.exists()


#: Job B beside job A's journal: (its own input?, extra flags, teacher model).
OTHER_JOB = {
    "other-input": (True, [], "echo"),
    "other-temperature": (False, ["--temperature", "0.3"], "echo"),
    "other-teacher": (False, [], "echo-2"),
}


@pytest.mark.parametrize("case", list(OTHER_JOB))
def test_a_journal_left_by_another_job_is_refused_not_merged(case, tmp_path, server, capsys):
    inp, inp2 = write_prompts(tmp_path / "a.jsonl", 40), write_prompts(tmp_path / "b.jsonl", 22)
    inp2.write_text(inp2.read_text().replace("question", "other question"))
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    _leave_journal(server, inp, out, cache)
    capsys.readouterr()
    journal = out.with_name("out.jsonl.partial")
    kept, received, paid_by_a = journal.read_bytes(), server.received, ResponseCache(cache).count()

    own_input, extra, model = OTHER_JOB[case]
    args = [*_generate(server, inp2 if own_input else inp, out, cache, model=model), *extra]
    assert distill_main(args) == 1
    line = _error(capsys)
    assert str(journal) in line and "--restart" in line
    assert server.received == received and journal.read_bytes() == kept and not out.exists()

    assert distill_main([*args, "--restart"]) == 0
    records = out.read_text().splitlines()
    assert len(records) == (22 if case == "other-input" else 40), "only the job's own records"

    before = server.received
    assert distill_main(_generate(server, inp, tmp_path / "again.jsonl", cache)) == 0
    assert server.received - before == 40 - paid_by_a, "job A's answers from before stay usable"


@pytest.mark.parametrize("change", ["parsing code", "reasoning mode"])
def test_a_journal_left_by_other_parsing_code_or_record_shaping_is_refused(change, tmp_path, server, capsys, monkeypatch):
    """The teacher and requests are the same, but the records would be made otherwise: never merged."""
    inp, out, cache = write_prompts(tmp_path / "a.jsonl", 40), tmp_path / "out.jsonl", tmp_path / "cache"
    _leave_journal(server, inp, out, cache)
    capsys.readouterr()
    extra = []
    if change == "parsing code":
        import synth.job

        monkeypatch.setattr(synth.job, "parser_code", lambda generator: "a fixed parser")
    else:
        extra = ["--reasoning", "inline"]
    assert distill_main([*_generate(server, inp, out, cache), *extra]) == 1
    line = _error(capsys)
    assert "left by an interrupted run of another job" in line and "--restart" in line
    received = server.received
    assert distill_main([*_generate(server, inp, out, cache), *extra, "--restart"]) == 0
    assert server.received - received <= 40 - 10, "the restart reuses every answer job A received"


def test_restart_pays_nothing_for_cached_answers(tmp_path, server, capsys):
    inp, out, cache = write_prompts(tmp_path / "a.jsonl", 40), tmp_path / "out.jsonl", tmp_path / "cache"
    _leave_journal(server, inp, out, cache)
    cached = ResponseCache(cache).count()
    assert cached >= 10
    assert distill_main(_generate(server, inp, out, cache, "--restart")) == 0
    assert server.received == 40 and server.repaid() == 0, "the restart asked only for what was never received"
    assert len(out.read_text().splitlines()) == 40


def test_multi_stage_commands_obey_restart_for_their_stage_journals(tmp_path, server, capsys):
    inp = write_prompts(tmp_path / "in.jsonl", 3)
    out = tmp_path / "self.jsonl"
    stage_journal = tmp_path / "self.work" / "samples.jsonl.partial"
    stage_journal.parent.mkdir()
    stage_journal.write_text(json.dumps({"journal": 1, "job": "another job"}) + "\n")
    args = ["self", "--student", _teacher(server), "--judge-by", "consistency", "--samples", "2", "--input", str(inp),
            "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert distill_main(args) == 1
    assert str(stage_journal) in _error(capsys) and server.received == 0
    assert distill_main([*args, "--restart"]) == 0
    assert out.exists() and not stage_journal.exists()


# -- a disk that fills up mid-job -------------------------------------------------------------------


def test_disk_full_mid_job_keeps_every_answer_received(tmp_path, monkeypatch, capsys):
    inp, out, cache = write_prompts(tmp_path / "in.jsonl", 40), tmp_path / "out.jsonl", tmp_path / "cache"
    with FaultServer(latency=0.05) as server:
        with monkeypatch.context() as m:
            _fail_journal_after(m, 5)
            assert distill_main(_generate(server, inp, out, cache, "--concurrency", "8")) == 1
        line = _error(capsys)
        assert str(out.with_name("out.jsonl.partial")) in line and "No space left on device" in line
        assert ResponseCache(cache).count() == server.completed, "every answer received reached the cache"
        assert distill_main(_generate(server, inp, out, cache)) == 0
        assert server.repaid() == 0 and server.completed == 40, "the rerun bought only what never arrived"
    assert len(out.read_text().splitlines()) == 40


# -- damaged state files ----------------------------------------------------------------------------


def _garbage(journal: Path) -> None:
    journal.write_bytes(bytes(range(256)) * 4)


def _bad_middle_line(journal: Path) -> None:
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[3] = b"this is not json\n"
    journal.write_bytes(b"".join(lines))


def _no_task(journal: Path) -> None:
    lines = journal.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[3])
    del entry["task"]
    lines[3] = (json.dumps(entry) + "\n").encode()
    journal.write_bytes(b"".join(lines))


@pytest.mark.parametrize("damage", [_garbage, _bad_middle_line, _no_task], ids=["garbage-bytes", "non-json-line", "line-without-task"])
def test_a_damaged_journal_is_one_line_naming_it(damage, tmp_path, server, capsys):
    inp, out, cache = write_prompts(tmp_path / "a.jsonl", 20), tmp_path / "out.jsonl", tmp_path / "cache"
    _leave_journal(server, inp, out, cache, 6)
    capsys.readouterr()
    journal = out.with_name("out.jsonl.partial")
    damage(journal)
    received = server.received
    assert distill_main(_generate(server, inp, out, cache)) == 1
    line = _error(capsys)
    assert str(journal) in line and "--restart" in line
    assert server.received == received
    assert distill_main(_generate(server, inp, out, cache, "--restart")) == 0


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_damaged_recipe_state_file_is_one_line_naming_it(dry_run, tmp_path, server, cache_dir, capsys):
    recipe = _recipe(tmp_path, server, "")
    assert distill_main(["run", str(recipe)]) == 0
    state = tmp_path / "run/.recipe/answers.json"
    state.write_bytes(b"\x00\xffnot json at all{")
    capsys.readouterr()
    assert distill_main(["run", str(recipe), *(["--dry-run"] if dry_run else [])]) == 1
    line = _error(capsys)
    assert str(state) in line and "delete it" in line


# -- recipes with odd values ------------------------------------------------------------------------


RECIPES = {
    "vars-is-a-list": (b"vars:\n  - a\n  - b\nstages:\n  - name: a\n    command: generate\n", "key 'vars'"),
    "vars-value-is-a-mapping": (b"vars:\n  out: {a: 1}\nstages:\n  - name: a\n    command: generate\n", "key 'vars.out'"),
    "not-utf8": (b"name: caf\xe9\nstages:\n  - name: a\n    command: generate\n", "not UTF-8"),
    "stage-value-is-a-mapping": (b"stages:\n  - name: a\n    command: generate\n    output: {x: 1}\n", "key 'output'"),
    "stage-value-is-empty": (b"stages:\n  - name: a\n    command: generate\n    output:\n", "key 'output'"),
    "stage-value-is-nested-list": (b"stages:\n  - name: a\n    command: generate\n    stop: [[a]]\n", "key 'stop'"),
    "command-is-a-list": (b"stages:\n  - name: a\n    command: [generate]\n", "key 'command'"),
    "stage-name-is-a-path": (b"stages:\n  - name: ../../escape\n    command: generate\n", "'name'"),
    "work-dir-is-a-mapping": (b"work_dir: {a: 1}\nstages:\n  - name: a\n    command: generate\n", "key 'work_dir'"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_a_recipe_with_odd_values_is_one_line_naming_file_and_key(case, tmp_path, capsys):
    text, key = RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    assert distill_main(["run", str(recipe)]) == 1
    line = _error(capsys)
    assert str(recipe) in line and key in line, line


# -- student derive --overwrite ---------------------------------------------------------------------


def test_derive_overwrite_replaces_only_a_student_it_made(tmp_path):
    from synth.errors import ConfigError
    from tests.tiny_models import make_tiny_llama
    from trainers.student import derive_student

    source = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a student made by"):
        derive_student(source, 2, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    student = derive_student(source, 2, tmp_path / "student")
    assert derive_student(source, 2, student, overwrite=True) == student, "its own earlier student is replaced"
