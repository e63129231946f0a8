"""Careless and hostile command lines: one clear line (never a traceback), exit 1, and flags checked like file keys.

Issue #12, groups "One clear line, never a traceback" and "Flags validated like file keys".
Each case runs the real `distill` entry point (in-process where stderr and the exit code
are all that matter, a subprocess where the real process is the point) and asserts the
one line names what is wrong and where. Tiny models come from tests/tiny_models.py.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import shutil
from pathlib import Path

import pytest

import distill.commands.teacher as teacher_command
from distill.cli import build_parser, main
from tests.conftest import free_port
from tests.reliability.harness import run_cli
from tests.tiny_models import make_tiny_llama, write_sft_records

SECRET = "hunter2-do-not-print"


def closed_teacher() -> str:
    """An openai teacher on a port nothing listens on: any request would fail, none should be sent."""
    return f"openai:m@http://127.0.0.1:{free_port()}/v1"


def assert_one_line(err: str, *expected: str) -> None:
    assert "Traceback" not in err and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer tiny Llama, made once for the module; tests copy it before breaking it."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a", "question": "1 + 1?"}\n{"prompt": "b", "question": "2 + 2?"}\n')
    return path


# --- One clear line, never a traceback ------------------------------------------------------------


def _raise(exc: BaseException):
    def command(args):
        raise exc

    return command


UNEXPECTED = {
    "RuntimeError with a secret URL": (RuntimeError(f"boom at https://user:{SECRET}@host/v1"), "RuntimeError: boom at https://***@host/v1"),
    "RecursionError (JSON nested 100k deep)": (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    "MemoryError": (MemoryError(), "out of memory"),
    "ValueError (5,000-digit integer)": (ValueError("Exceeds the limit (4300 digits) for integer string conversion"), "ValueError: Exceeds the limit"),
    "over-long path": (OSError(errno.ENAMETOOLONG, "File name too long", "/tmp/" + "a" * 5000), "/tmp/aaaa"),
    "read-only output": (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out.jsonl"), "/mnt/ro/out.jsonl: Read-only file system"),
    "multi-line library message": (ValueError("first line\nsecond line\n\nthird"), "ValueError: first line second line third"),
}


@pytest.mark.parametrize("case", list(UNEXPECTED))
def test_any_exception_is_one_line_exit_1(monkeypatch, capsys, case):
    exc, expected = UNEXPECTED[case]
    monkeypatch.setattr(teacher_command, "run_check", _raise(exc))
    assert main(["teacher", "check"]) == 1
    err = capsys.readouterr().err
    assert_one_line(err, "error: ", expected)
    assert SECRET not in err and len(err) < 800, err
    if not isinstance(exc, OSError):
        assert "test_hostile_cli.py:" in err and "--debug" in err, "names where it happened and how to see more"


@pytest.mark.parametrize("how", ["--debug flag", "BBD_DEBUG=1"])
def test_debug_shows_the_traceback_still_redacted(monkeypatch, capsys, how):
    monkeypatch.setattr(teacher_command, "run_check", _raise(RuntimeError(f"boom at https://user:{SECRET}@host/v1")))
    if how == "BBD_DEBUG=1":
        monkeypatch.setenv("BBD_DEBUG", "1")
    assert main((["--debug"] if how == "--debug flag" else []) + ["teacher", "check"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: RuntimeError")
    assert SECRET not in err


def test_ctrl_c_is_still_130(monkeypatch, capsys):
    monkeypatch.setattr(teacher_command, "run_check", _raise(KeyboardInterrupt()))
    assert main(["teacher", "check"]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "--input", "x", "--output", "y", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "--input", "x"], "the following arguments are required: --output"),
        (["generate", "--input", "x", "--output", "y", f"https://u:{SECRET}@host/v1"], "unrecognized arguments: https://***@host/v1"),
    ],
    ids=["unknown flag", "missing flag", "stray URL with a password"],
)
def test_usage_errors_are_one_redacted_line_exit_1(capsys, argv, expected):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert_one_line(err, "error: ", expected)
    assert SECRET not in err


def test_an_output_under_proc_is_one_line_naming_the_path(tiny, tmp_path, capsys):
    assert main(["student", "derive", "--from", str(tiny), "--keep", "2", "--out", "/proc/self/no/student"]) == 1
    assert_one_line(capsys.readouterr().err, "error: /proc/self/no")


def test_an_over_long_output_path_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / ("x" * 300) / "student"
    assert main(["student", "derive", "--from", str(tiny), "--keep", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert_one_line(err, "File name too long", "characters)")
    assert len(err) < 600


def test_a_real_unexpected_failure_in_a_subprocess_has_no_traceback(tiny, tmp_path):
    # A folder under /proc as the output: the OSError comes from deep inside; the process prints one line.
    result = run_cli("student", "derive", "--from", str(tiny), "--keep", "2", "--out", "/proc/self/no/student", cache=tmp_path / "c")
    assert result.returncode == 1
    assert_one_line(result.stderr, "error: /proc/self/no: No such file or directory")


# --- Flags validated like file keys ---------------------------------------------------------------


def _gen(*extra: str) -> list[str]:
    return ["generate", "--teacher", closed_teacher(), "--input", "{prompts}", "--output", "{out}", "--quiet", *extra]


FLAGS = {
    "--concurrency 0": (_gen("--concurrency", "0"), "argument --concurrency: Input should be greater than or equal to 1"),
    "--concurrency -5": (_gen("--concurrency", "-5"), "argument --concurrency:"),
    "--max-retries -1": (_gen("--max-retries", "-1"), "argument --max-retries: Input should be greater than or equal to 0"),
    "--batch-size 0": (_gen("--batch-size", "0"), "argument --batch-size:"),
    "--timeout 0": (_gen("--timeout", "0"), "argument --timeout: Input should be greater than 0"),
    "--temperature inf": (_gen("--temperature", "inf"), "argument --temperature: expected a finite number"),
    "--temperature nan": (_gen("--temperature", "nan"), "argument --temperature: expected a finite number"),
    "--logprobs 99": (_gen("--logprobs", "99"), "argument --logprobs: Input should be less than or equal to 20"),
    "generate --limit -1": (_gen("--limit", "-1"), "argument --limit: Input should be greater than or equal to 1"),
    "generate --limit 0": (_gen("--limit", "0"), "argument --limit:"),
    "label --limit -1": (["label", "--input", "{prompts}", "--output", "{out}", "--limit", "-1"], "argument --limit:"),
    "label --concurrency 0": (["label", "--input", "{prompts}", "--output", "{out}", "--concurrency", "0"], "argument --concurrency:"),
    "label -n 0": (["label", "--input", "{prompts}", "--output", "{out}", "-n", "0"], "argument -n:"),
    "feedback --limit -1": (["feedback", "--input", "{prompts}", "--output", "{out}", "--limit", "-1"], "argument --limit:"),
    "self --limit -1": (["self", "--input", "{prompts}", "--output", "{out}", "--limit", "-1"], "argument --limit:"),
    "eval --limit -1": (["eval", "--prompts", "{prompts}", "--output-dir", "{out}", "--limit", "-1"], "argument --limit:"),
    "train --max-steps 0": (["train", "sft", "--data", "{prompts}", "--output-dir", "{out}", "--max-steps", "0"],
                            "argument --max-steps: must be at least 1, or -1 to train for `epochs`"),
    "train --max-steps -5": (["train", "sft", "--data", "{prompts}", "--output-dir", "{out}", "--max-steps", "-5"], "argument --max-steps:"),
    "train --learning-rate 0": (["train", "sft", "--data", "{prompts}", "--output-dir", "{out}", "--learning-rate", "0"], "argument --learning-rate:"),
    "train --learning-rate inf": (["train", "sft", "--data", "{prompts}", "--output-dir", "{out}", "--learning-rate", "inf"], "argument --learning-rate:"),
    "train --batch-size 0": (["train", "dpo", "--data", "{prompts}", "--output-dir", "{out}", "--batch-size", "0"], "argument --batch-size:"),
    "train --epochs 0": (["train", "sft", "--data", "{prompts}", "--output-dir", "{out}", "--max-steps", "-1", "--epochs", "0"], "argument --epochs:"),
    "train --device gpu": (["train", "sft", "--data", "{prompts}", "--output-dir", "{out}", "--device", "gpu"], "'gpu' is not a device"),
    "teacher port 99999": (["generate", "--teacher", "openai:m@http://127.0.0.1:99999/v1", "--input", "{prompts}", "--output", "{out}"],
                           "Port out of range 0-65535"),
    "teacher URL without a scheme": (["generate", "--teacher", "openai:m@localhost:8000/v1", "--input", "{prompts}", "--output", "{out}"],
                                     "expected an http:// or https:// URL"),
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_bad_flag_values_stop_before_any_work(tmp_path, prompts, cache_dir, capsys, case):
    argv, expected = FLAGS[case]
    out = tmp_path / "out"
    argv = [a.format(prompts=prompts, out=out) for a in argv]
    assert main(argv) == 1
    assert_one_line(capsys.readouterr().err, expected)
    assert not out.exists(), "nothing written"


def test_teacher_overrides_are_validated_and_name_the_flag(tmp_path):
    from distill.commands.common import teacher_config, teacher_overrides
    from synth.errors import ConfigError

    # The flags' own types catch this at parsing; teacher_config is the same check for any caller.
    args = argparse.Namespace(teacher=closed_teacher(), concurrency=0, batch_size=None, timeout=-1.0, max_retries=None, api_key_env=None)
    with pytest.raises(ConfigError, match=r"--concurrency: Input should be greater than or equal to 1; --timeout: Input should be greater than 0"):
        teacher_config(args.teacher, teacher_overrides(vars(args)))


def test_sampling_params_refuse_non_finite_values():
    from pydantic import ValidationError

    from synth.teachers import SamplingParams

    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValidationError, match="finite number"):
            SamplingParams(temperature=bad)


def test_a_recipe_stage_with_a_bad_setting_is_refused_before_the_first_stage(tmp_path, prompts, capsys, cache_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: r\nwork_dir: {tmp_path / 'run'}\nteacher: {closed_teacher()}\nstages:\n"
        f"  - {{name: first, command: generate, input: {prompts}, output: {tmp_path / 'run' / 'first.jsonl'}}}\n"
        f"  - {{name: second, command: generate, input: {prompts}, output: {tmp_path / 'run' / 'second.jsonl'}, concurrency: 0}}\n"
    )
    assert main(["run", str(recipe)]) == 1
    assert_one_line(capsys.readouterr().err, "stage 'second': key 'concurrency': Input should be greater than or equal to 1")
    assert not (tmp_path / "run" / "first.jsonl").exists(), "the first stage did not run"


@pytest.fixture
def no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_train_on_cuda_without_a_gpu(tmp_path, no_gpu, capsys):
    data = write_sft_records(tmp_path / "d.jsonl", 2)
    assert main(["train", "sft", "--model", str(tmp_path / "none"), "--data", str(data), "--output-dir", str(tmp_path / "s"), "--device", "cuda"]) == 1
    assert_one_line(capsys.readouterr().err, "--device cuda: no CUDA GPU is available here")
    assert not (tmp_path / "s").exists()


def test_eval_on_cuda_without_a_gpu_pays_nothing(tiny, tmp_path, prompts, no_gpu, capsys, cache_dir):
    argv = ["eval", "--students", str(tiny), "--teacher", closed_teacher(), "--prompts", str(prompts),
            "--output-dir", str(tmp_path / "e"), "--device", "cuda:1"]  # fmt: skip
    assert main(argv) == 1
    assert_one_line(capsys.readouterr().err, "--device cuda:1: no CUDA GPU")
    assert not (tmp_path / "e").exists()


def test_a_local_teacher_on_cuda_without_a_gpu(tiny, tmp_path, prompts, no_gpu, capsys, cache_dir):
    spec = tmp_path / "teacher.yaml"
    spec.write_text(f"backend: transformers\nmodel: {tiny}\ndevice: cuda\n")
    assert main(["generate", "--teacher", str(spec), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--quiet"]) == 1
    assert_one_line(capsys.readouterr().err, "teacher device cuda: no CUDA GPU")
    assert not (tmp_path / "o.jsonl").exists()


# --- Model-load errors in train, derive and eval ---------------------------------------------------


def _broken_json(config: dict) -> str:
    return json.dumps(config)[:-20]


def _unknown_type(config: dict) -> str:
    return json.dumps({**config, "model_type": "no_such_architecture"})


def _remote_code(config: dict) -> str:
    return json.dumps({**config, "model_type": "my_custom_llm", "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomLM"}})


BROKEN = {
    "invalid config.json": (_broken_json, "config.json: not valid JSON"),
    "unknown model_type": (_unknown_type, "config.json: unknown model_type 'no_such_architecture'"),
    "remote code without trust": (_remote_code, "runs its own model code (auto_map"),
}


def _command(kind: str, model: Path, tmp_path: Path, prompts: Path) -> list[str]:
    if kind == "train sft":
        data = write_sft_records(tmp_path / "d.jsonl", 2)
        return ["train", "sft", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "result"), "--max-steps", "1"]
    if kind == "student derive":
        return ["student", "derive", "--from", str(model), "--keep", "2", "--out", str(tmp_path / "result")]
    return ["eval", "--students", str(model), "--teacher", closed_teacher(), "--prompts", str(prompts), "--output-dir", str(tmp_path / "result")]


@pytest.mark.parametrize("kind", ["train sft", "student derive", "eval"])
@pytest.mark.parametrize("breakage", list(BROKEN))
def test_a_model_that_cannot_load_is_one_line_naming_it(tiny, tmp_path, prompts, capsys, cache_dir, kind, breakage):
    model = tmp_path / "broken-model"
    shutil.copytree(tiny, model)
    make, expected = BROKEN[breakage]
    (model / "config.json").write_text(make(json.loads((tiny / "config.json").read_text())))
    if kind == "student derive" and breakage == "remote code without trust":
        expected = "model type 'my_custom_llm' is not supported for layer dropping"  # derive never runs a checkpoint's code
    assert main(_command(kind, model, tmp_path, prompts)) == 1
    assert_one_line(capsys.readouterr().err, "broken-model", expected)
    assert not (tmp_path / "result").exists()


def test_missing_weights_are_one_line_naming_the_model(tiny, tmp_path, capsys):
    model = tmp_path / "no-weights"
    shutil.copytree(tiny, model)
    (model / "model.safetensors").unlink()
    assert main(["student", "derive", "--from", str(model), "--keep", "2", "--out", str(tmp_path / "result")]) == 1
    assert_one_line(capsys.readouterr().err, "no-weights: cannot load this model")


# --- Outputs that are files -----------------------------------------------------------------------


def test_derive_out_pointing_at_a_file(tiny, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["student", "derive", "--from", str(tiny), "--keep", "2", "--out", str(target), "--overwrite"]) == 1
    assert_one_line(capsys.readouterr().err, f"--out {target}: not a directory")
    assert target.read_text() == "mine"


def test_eval_output_dir_pointing_at_a_file_pays_nothing(tiny, tmp_path, prompts, capsys, cache_dir):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    argv = ["eval", "--students", str(tiny), "--teacher", closed_teacher(), "--prompts", str(prompts), "--output-dir", str(target / "sub")]
    assert main(argv) == 1
    assert_one_line(capsys.readouterr().err, f"--output-dir {target / 'sub'}: not a directory ({target} is a file)")
    assert target.read_text() == "mine"
    assert main(argv[:-1] + [str(target)]) == 1
    assert_one_line(capsys.readouterr().err, f"--output-dir {target}: not a directory")


def test_train_output_dir_pointing_at_a_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    data = write_sft_records(tmp_path / "d.jsonl", 2)
    # The model does not exist: the output is checked before anything is loaded.
    assert main(["train", "sft", "--model", str(tmp_path / "none"), "--data", str(data), "--output-dir", str(target)]) == 1
    assert_one_line(capsys.readouterr().err, f"--output-dir {target}: not a directory")
    assert target.read_text() == "mine"


# --- push offline or failing ----------------------------------------------------------------------


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "endpoint refuses"])
def test_push_that_cannot_reach_the_hub_is_one_line_without_the_token(tmp_path, offline):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    token = "hf_" + SECRET.replace("-", "") + "abcdef"
    env = {"HF_TOKEN": token, "HF_HUB_OFFLINE": "1" if offline else "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    result = run_cli("push", str(folder), "--repo", "me/data", cache=tmp_path / "c", env=env, timeout=120)
    assert result.returncode == 1
    assert_one_line(result.stderr, "error: push to me/data (dataset)", "failed:")
    assert token not in result.stderr + result.stdout


# --- Trackers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tracker, expected", [("wandb", "wandb is not installed here"), ("wandbb", "unknown tracker")])
def test_report_to_a_missing_tracker_stops_before_training(tmp_path, monkeypatch, capsys, tracker, expected):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])  # as on a machine without wandb
    data = write_sft_records(tmp_path / "d.jsonl", 2)
    # The model does not exist: the tracker is checked before anything is loaded.
    argv = ["train", "sft", "--model", str(tmp_path / "none"), "--data", str(data), "--output-dir", str(tmp_path / "s"), "--report-to", tracker]
    assert main(argv) == 1
    assert_one_line(capsys.readouterr().err, f"--report-to {tracker}: {expected}")
    assert not (tmp_path / "s").exists()


# --- Help text ------------------------------------------------------------------------------------


def _all_parsers(parser: argparse.ArgumentParser, prefix: list[str]):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _all_parsers(child, prefix + [name])


def test_no_help_text_prints_a_python_dict_or_repr():
    leaks = []
    for prefix, parser in _all_parsers(build_parser(), []):
        text = parser.format_help()
        if re.search(r"\{'|\['|<class |object at 0x|PosixPath\(|Field\(", text):
            leaks.append(" ".join(prefix))
    assert not leaks, leaks


def test_gradient_checkpointing_help_reads_as_text():
    parser = dict((" ".join(p), x) for p, x in _all_parsers(build_parser(), []))["train sft"]
    text = " ".join(parser.format_help().split())
    assert "less memory, ~30 % slower; for large students" in text and "option_strings" not in text, text
