"""Teacher configuration and the `--teacher SPEC` mini-language."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synth import safe_yaml
from synth.errors import ConfigError, describe_validation_error
from synth.redact import redact

EMBEDDED = "embedded"
#: What a `device` setting may say; whether the machine has that device is checked when a model is loaded.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class TeacherSettings(BaseModel):
    """Everything needed to build a teacher. A YAML teacher file maps onto it one-to-one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backend: Literal["openai", "transformers", "vllm"] = Field(
        "transformers", description="openai: any OpenAI-compatible HTTP API; transformers: a local model; vllm: in-process engine."
    )
    model: str = Field(EMBEDDED, description="Model name (openai, vllm) or path; 'embedded' is the bundled SmolLM2-135M-Instruct.")
    base_url: str | None = Field(None, description="openai: the API's base URL, e.g. http://127.0.0.1:8000/v1.")
    base_urls: list[str] = Field(
        default_factory=list,
        description="openai: several endpoints serving the same model (a vLLM/SGLang server per GPU, regional endpoints), "
        "instead of base_url: each request goes to the one with the fewest in flight, and one that keeps failing is rested.",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    concurrency: int | None = Field(None, ge=1, description="Requests in flight at once (default: 64 openai, 1 local).")
    batch_size: int | None = Field(None, ge=1, description="Local backends: samples per forward batch for transformers (default 16), requests per engine call for vllm (default 256).")
    timeout: float = Field(
        600.0, gt=0,
        description="openai: seconds before a request is abandoned and retried. Reasoning models think for minutes, and an "
        "answer our own timeout kills is paid for and thrown away, so this is long.",
    )
    max_retries: int = Field(6, ge=0, description="openai: retries of a transient failure (429, 5xx, timeout, dropped connection).")
    backoff_base: float = Field(0.5, ge=0, description="openai: first retry delay in seconds, doubled each retry, with jitter.")
    backoff_max: float = Field(30.0, ge=0, description="openai: longest delay between retries (Retry-After may ask for more).")
    reasoning_model: bool = Field(
        False,
        description="openai: an OpenAI reasoning model (o-series, gpt-5 family): send max_completion_tokens, and no "
        "temperature/top_p (they refuse both). Left false, the first 400 that names such a parameter switches it on.",
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="openai: reasoning_effort sent with every request (reasoning models); unset, the server's default."
    )
    structured_output: Literal["auto", "json_schema", "json_object", "prompt"] = Field(
        "auto", description="openai: how to ask for JSON; auto tries json_schema, then json_object, then prompting."
    )
    device: str = Field("auto", description="Local backends: cpu, cuda, cuda:1 or auto.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Local backends: weights dtype.")
    trust_remote_code: bool = Field(False, description="Local backends: run model code shipped with the checkpoint.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="vllm: extra keyword arguments for vllm.LLM.")
    tokenizer: str | None = Field(
        None,
        description="openai: the teacher's tokenizer (a Hub name or a local directory), written into its soft labels so KD "
        "can check that a student shares its vocabulary; an HTTP API's logprobs name token strings only.",
    )
    price_per_mtok_in: float | None = Field(None, ge=0, description="Cost estimate: price per million prompt tokens.")
    price_per_mtok_out: float | None = Field(None, ge=0, description="Cost estimate: price per million completion tokens.")
    batch: bool = Field(
        False,
        description="openai: send the requests through the provider's Batch API (upload, poll, download; cheaper, "
        "slower) instead of one HTTP request each; answers go to the same response cache (see synth/teachers/batch.py).",
    )
    batch_max_requests: int = Field(50_000, ge=1, description="batch: most requests in one batch (OpenAI's limit: 50,000).")
    batch_max_bytes: int = Field(200_000_000, ge=1024, description="batch: largest request file of one batch (OpenAI's limit: 200 MB).")
    batch_poll_interval: float = Field(60.0, gt=0, description="batch: seconds between two looks at a batch in progress.")
    batch_max_attempts: int = Field(
        3, ge=1, description="batch: batches one request may go through (a failed or expired request goes into a new one) before it is a reject."
    )
    batch_fallback: Literal["batch", "online"] = Field(
        "batch", description="batch: where requests that failed or expired in a batch go: a new batch, or the online API (full price)."
    )
    batch_discount: float = Field(
        0.5, ge=0, le=1, description="batch: the batch price as a share of price_per_mtok_in/out (OpenAI: half price); used by estimates, costs and --budget-usd."
    )
    batch_completion_window: str = Field("24h", description="batch: the completion window asked for (OpenAI accepts only 24h).")
    batch_state_dir: str | None = Field(
        None, description="batch: where the ids of submitted batches are kept (default: beside the response cache, $BBD_RESPONSE_CACHE)."
    )

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        """An http(s) URL with a host and a valid port, so a typo stops here rather than at the first request."""
        return None if value is None else check_url(value)

    @field_validator("base_urls")
    @classmethod
    def _check_base_urls(cls, value: list[str]) -> list[str]:
        """Each an http(s) URL, as base_url is."""
        return [check_url(url) for url in value]

    @model_validator(mode="after")
    def _one_way_to_name_endpoints(self) -> "TeacherSettings":
        if self.base_url and self.base_urls:
            raise ValueError("give base_url or base_urls, not both")
        return self

    @model_validator(mode="after")
    def _batch_needs_one_openai_endpoint(self) -> "TeacherSettings":
        if self.batch and self.backend != "openai":
            raise ValueError("batch: true needs backend: openai (the provider's Batch API)")
        if self.batch and len(self.base_urls) > 1:
            raise ValueError("batch: true sends each batch to one endpoint: give base_url, not several base_urls")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        """auto, cpu, mps, cuda or cuda:N."""
        return check_device_name(value)


def check_url(value: str) -> str:
    """`value` if it is an http(s) URL with a host and a valid port; a ValueError (credentials masked) otherwise."""
    shown = redact(value)
    try:
        parts = urlsplit(value.strip())
        parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"{shown!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{shown!r}: expected an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1")
    return value


def check_device_name(value: str) -> str:
    """`value` if it names a device (auto, cpu, mps, cuda, cuda:N); a ValueError otherwise."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return value


def check_device_available(device: str, setting: str = "device") -> None:
    """A ConfigError when `device` asks for a GPU this machine does not have (rather than running on the CPU)."""
    if not device.startswith(("cuda", "mps")):
        return
    import torch

    if device.startswith("mps"):
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{setting} {device}: no Apple GPU (MPS) is available here; use auto or cpu")
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting} {device}: no CUDA GPU is available here (or this torch build lacks CUDA); use auto or cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{setting} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")


def parse_teacher_spec(spec: str | None) -> TeacherSettings:
    """Turn `embedded`, `hf:PATH`, `vllm:MODEL`, `openai:MODEL@BASE_URL` or a YAML path into a config."""
    if spec is None or spec == EMBEDDED:
        return TeacherSettings()
    if spec.endswith((".yaml", ".yml")):
        return load_teacher_file(Path(spec))
    kind, sep, rest = spec.partition(":")
    if sep and rest:
        if kind == "hf":
            return TeacherSettings(backend="transformers", model=rest)
        if kind == "vllm":
            return TeacherSettings(backend="vllm", model=rest)
        if kind == "openai":
            model, at, base_url = rest.partition("@")
            if not model:
                raise ConfigError(f"teacher spec {spec!r}: openai needs a model name, as openai:MODEL@BASE_URL")
            try:
                return TeacherSettings(backend="openai", model=model, base_url=base_url or None)
            except ValidationError as exc:
                reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise ConfigError(f"teacher spec {redact(spec)!r}: {reasons}") from None
    raise ConfigError(
        f"unknown teacher spec {spec!r}: use embedded, hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL or a .yaml file"
    )


def load_teacher_file(path: Path) -> TeacherSettings:
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
        return TeacherSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc, 'key')}") from None


class TeacherOverrides(BaseModel):
    """Teacher settings given once for every teacher a command builds (its --concurrency, --timeout, ... flags)."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int | None = None
    batch_size: int | None = None
    timeout: float | None = None
    max_retries: int | None = None
    api_key_env: str | None = None

    def given(self) -> dict[str, Any]:
        """The settings actually given."""
        return self.model_dump(exclude_none=True)


def resolve_teacher(spec: str | None, overrides: TeacherOverrides | None = None) -> TeacherSettings:
    """The config a spec names, with the overrides applied and checked like a teacher file's keys."""
    config = parse_teacher_spec(spec)
    given = overrides.given() if overrides is not None else {}
    if not given:
        return config
    try:
        return TeacherSettings.model_validate({**config.model_dump(), **given})
    except ValidationError as exc:
        raise ConfigError(redact(f"teacher {spec}: {describe_validation_error(exc, 'setting')}")) from None
