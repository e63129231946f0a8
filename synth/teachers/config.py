"""Teacher configuration and the `--teacher SPEC` mini-language."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth import safe_yaml
from synth.errors import ConfigError, describe_validation_error

EMBEDDED = "embedded"


class TeacherConfig(BaseModel):
    """Everything needed to build a teacher. A YAML teacher file maps onto it one-to-one."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["openai", "transformers", "vllm"] = Field(
        "transformers", description="openai: any OpenAI-compatible HTTP API; transformers: a local model; vllm: in-process engine."
    )
    model: str = Field(EMBEDDED, description="Model name (openai, vllm) or path; 'embedded' is the bundled SmolLM2-135M-Instruct.")
    base_url: str | None = Field(None, description="openai: the API's base URL, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    concurrency: int | None = Field(None, ge=1, description="Requests in flight at once (default: 64 openai, 1 local).")
    batch_size: int | None = Field(None, ge=1, description="Local backends: samples per forward batch for transformers (default 16), requests per engine call for vllm (default 256).")
    timeout: float = Field(120.0, gt=0, description="openai: seconds before a request is abandoned and retried.")
    max_retries: int = Field(6, ge=0, description="openai: retries of a transient failure (429, 5xx, timeout, dropped connection).")
    backoff_base: float = Field(0.5, ge=0, description="openai: first retry delay in seconds, doubled each retry, with jitter.")
    backoff_max: float = Field(30.0, ge=0, description="openai: longest delay between retries (Retry-After may ask for more).")
    structured_output: Literal["auto", "json_schema", "json_object", "prompt"] = Field(
        "auto", description="openai: how to ask for JSON; auto tries json_schema, then json_object, then prompting."
    )
    device: str = Field("auto", description="Local backends: cpu, cuda, cuda:1 or auto.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Local backends: weights dtype.")
    trust_remote_code: bool = Field(False, description="Local backends: run model code shipped with the checkpoint.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="vllm: extra keyword arguments for vllm.LLM.")
    price_per_mtok_in: float | None = Field(None, ge=0, description="Cost estimate: price per million prompt tokens.")
    price_per_mtok_out: float | None = Field(None, ge=0, description="Cost estimate: price per million completion tokens.")


def parse_teacher_spec(spec: str | None) -> TeacherConfig:
    """Turn `embedded`, `hf:PATH`, `vllm:MODEL`, `openai:MODEL@BASE_URL` or a YAML path into a config."""
    if spec is None or spec == EMBEDDED:
        return TeacherConfig()
    if spec.endswith((".yaml", ".yml")):
        return load_teacher_file(Path(spec))
    kind, sep, rest = spec.partition(":")
    if sep and rest:
        if kind == "hf":
            return TeacherConfig(backend="transformers", model=rest)
        if kind == "vllm":
            return TeacherConfig(backend="vllm", model=rest)
        if kind == "openai":
            model, at, base_url = rest.partition("@")
            if not model:
                raise ConfigError(f"teacher spec {spec!r}: openai needs a model name, as openai:MODEL@BASE_URL")
            return TeacherConfig(backend="openai", model=model, base_url=base_url or None)
    raise ConfigError(
        f"unknown teacher spec {spec!r}: use embedded, hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL or a .yaml file"
    )


def load_teacher_file(path: Path) -> TeacherConfig:
    """Read a teacher YAML file; errors name the file and the key."""
    if not path.is_file():
        raise ConfigError(f"{path}: teacher file not found")
    try:
        data = safe_yaml.load(path.read_text(encoding="utf-8"), path) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("teacher"), dict):
        data = data["teacher"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of teacher settings")
    try:
        return TeacherConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc, 'key')}") from None
