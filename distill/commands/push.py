"""`distill push PATH --repo ORG/NAME`: a dataset folder or a model directory to the Hugging Face Hub.

A dataset folder is what a synth command or a recipe writes (JSONL + the README.md card
that the Hub reads); a model directory is what a trainer writes (config.json + weights).
Everything that can go wrong before the network (path, type, token) fails first, with
one line naming the fix.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from synth.errors import ConfigError
from synth.layout import WORK_SUFFIXES

#: Files that mark a folder as a dataset (what synth writes, and what `datasets` loads from a folder).
DATASET_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
#: Never uploaded: resumable checkpoints, unfinished journals and stage folders are working state, not results.
# Checkpoints, recipe state, and a job's work files (journals, stage folders) are never published.
IGNORE = ["checkpoint-*/**", "**/checkpoint-*/**", ".recipe/**",
          *(p for s in WORK_SUFFIXES for p in (f"*{s}", f"**/*{s}", f"*{s}/**", f"**/*{s}/**"))]


def register(sub) -> None:
    """Add the `push` command."""
    p = sub.add_parser(
        "push",
        help="upload a dataset folder or a model directory to the Hugging Face Hub",
        description="Creates the repository if it does not exist (private with --private), then uploads the folder "
        "in one commit. The type is detected from the folder: config.json makes it a model, JSONL (or JSON, "
        "Parquet, CSV) files a dataset; --type overrides. Checkpoints, *.partial journals and *.work/ stage "
        "folders are left out. The token is read from the environment variable --token-env names and is never "
        "printed.",
    )
    p.add_argument("path", type=Path, help="a dataset folder (JSONL + README.md card) or a model directory")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub repository, e.g. my-org/gsm8k-cot")
    p.add_argument("--type", dest="repo_type", choices=["auto", "dataset", "model"], default="auto",
                   help="repository type (default: auto, from the folder's files)")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its visibility)")
    p.add_argument("--token-env", default="HF_TOKEN", metavar="VAR", help="environment variable holding the token (default: HF_TOKEN)")
    p.add_argument("--message", default=None, help="commit message (default: 'Upload with blackbox-distill')")
    p.set_defaults(func=run)


def check_folder(path: Path) -> Path:
    """The path if it is a folder; a missing path or a file is a ConfigError saying which."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ConfigError(f"{path}: push a folder, not a file (the dataset's folder holds its README.md card: {path.parent})")
    return path


def detect_type(path: Path) -> str:
    """'model' for a directory with config.json, 'dataset' for one with data files; else a ConfigError."""
    check_folder(path)
    if (path / "config.json").is_file():
        return "model"
    if any(f.suffix in DATASET_SUFFIXES for f in path.iterdir() if f.is_file()):
        return "dataset"
    raise ConfigError(f"{path}: neither a model (no config.json) nor a dataset (no {', '.join(DATASET_SUFFIXES)} files); pass --type")


def check_repo(repo: str) -> str:
    """The repo id if it looks like ORG/NAME (the Hub would refuse anything else after the upload began)."""
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo):
        raise ConfigError(f"--repo {repo!r}: expected ORG/NAME, e.g. my-org/gsm8k-cot")
    return repo


def read_token(var: str) -> str:
    """The token from the environment; a missing one is an error naming the variable."""
    token = os.environ.get(var, "").strip()
    if not token:
        raise ConfigError(f"${var} is not set: export a Hugging Face token with write access (huggingface.co/settings/tokens), "
                          "or name the variable holding one with --token-env")
    return token


def run(args: argparse.Namespace) -> int:
    """Check everything offline, then create the repository and upload the folder."""
    check_folder(args.path)
    repo_type = detect_type(args.path) if args.repo_type == "auto" else args.repo_type
    repo = check_repo(args.repo)
    token = read_token(args.token_env)
    if repo_type == "dataset" and not (args.path / "README.md").is_file():
        print(f"warning: {args.path} has no README.md: the Hub will show no dataset card (`distill run` writes one)")

    from huggingface_hub import HfApi  # imported here: `distill --help` stays fast

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, repo_type=repo_type, private=args.private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo, repo_type=repo_type, folder_path=args.path, ignore_patterns=IGNORE,
            commit_message=args.message or "Upload with blackbox-distill",
        )
    except Exception as exc:  # offline, refused, unauthorised, rate-limited: the Hub's reason, on one line
        from huggingface_hub import constants

        raise ConfigError(f"push to {repo} ({repo_type}) at {constants.ENDPOINT} failed: {hub_reason(exc, token)}") from None
    print(f"pushed {args.path} to {url} ({repo_type}); commit {getattr(commit, 'oid', '')[:12]}")
    return 0


def hub_reason(exc: Exception, token: str) -> str:
    """What the Hub client said, on one line, with the token masked wherever it appears."""
    from synth.redact import redact

    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text.replace(token, "***"))[:500]
