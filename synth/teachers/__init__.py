"""Teacher backends behind one protocol, and the factory that builds one from a config."""

from __future__ import annotations

from synth.teachers.base import (
    Capabilities,
    ChatRequest,
    ChatResponse,
    Completion,
    PermanentTeacherError,
    Prices,
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
    """Build the teacher a config describes, carrying its prices; heavy backends are imported only when asked for."""
    teacher: Teacher
    if config.backend == "openai" and config.batch:
        from synth.teachers.batch import BatchTeacher, batch_prices

        teacher = BatchTeacher(config)
        teacher.prices = batch_prices(config)  # what a batch costs: the prices times batch_discount
        return teacher
    if config.backend == "openai":
        from synth.teachers.openai_api import OpenAITeacher

        teacher = OpenAITeacher(config)
    elif config.backend == "vllm":
        from synth.teachers.vllm_engine import VLLMTeacher

        teacher = VLLMTeacher(config)
    else:
        from synth.teachers.local import TransformersTeacher

        teacher = TransformersTeacher(config)
    # On the teacher, not beside its config: every job it serves (one per pipeline stage) shows what it costs.
    teacher.prices = Prices(config.price_per_mtok_in, config.price_per_mtok_out)
    return teacher


__all__ = [
    "Capabilities",
    "ChatRequest",
    "ChatResponse",
    "Completion",
    "PermanentTeacherError",
    "Prices",
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
