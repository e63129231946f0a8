"""Teacher backends behind one protocol, and the factory that builds one from a config."""

from __future__ import annotations

from synth.teachers.base import (
    Capabilities,
    ChatRequest,
    ChatResponse,
    Completion,
    PermanentTeacherError,
    SamplingParams,
    Teacher,
    TeacherError,
    TokenLogprob,
    TopLogprob,
    TransientTeacherError,
    Usage,
)
from synth.teachers.config import TeacherSettings, TeacherOverrides, parse_teacher_spec, resolve_teacher


def build_teacher(config: TeacherSettings) -> Teacher:
    """Build the teacher a config describes; heavy backends are imported only when asked for."""
    if config.backend == "openai":
        from synth.teachers.openai_api import OpenAITeacher

        return OpenAITeacher(config)
    if config.backend == "vllm":
        from synth.teachers.vllm_engine import VLLMTeacher

        return VLLMTeacher(config)
    from synth.teachers.local import TransformersTeacher

    return TransformersTeacher(config)


__all__ = [
    "Capabilities",
    "ChatRequest",
    "ChatResponse",
    "Completion",
    "PermanentTeacherError",
    "SamplingParams",
    "Teacher",
    "TeacherSettings",
    "TeacherOverrides",
    "TeacherError",
    "TokenLogprob",
    "TopLogprob",
    "TransientTeacherError",
    "Usage",
    "build_teacher",
    "parse_teacher_spec",
    "resolve_teacher",
]
