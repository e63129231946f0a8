"""The in-process vLLM teacher: one `LLM.chat` call per batch on a local GPU.

Targets vLLM's offline API (`vllm.LLM`, `LLM.chat`, `SamplingParams`,
`RequestOutput`/`CompletionOutput`, `Logprob`), with structured outputs via
`SamplingParams(structured_outputs=StructuredOutputsParams(json=...))` and a
fall-back to the pre-0.12 `guided_decoding=GuidedDecodingParams(json=...)`.
The translation to and from vLLM lives in pure, duck-typed functions so it is
tested without vLLM installed.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from synth.errors import ConfigError
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
    Usage,
)
from synth.teachers.config import TeacherSettings
from synth.teachers.reasoning import split_generated, spelled_by
from synth.teachers.weights import directory_fingerprint

INSTALL_HINT = "pip install 'blackbox-distill[vllm]'"
DEFAULT_BATCH_SIZE = 256

#: (keyword of vLLM's SamplingParams, factory called as factory(json=schema)).
JsonField = tuple[str, Callable[..., Any]]
#: Token ids → their text, as the engine detokenizes them.
Decode = Callable[[list[int]], str]


#: Engine arguments that change how fast the engine runs, or where, never what it answers.
SPEED_ONLY_ARGS = frozenset({
    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "gpu_memory_utilization", "swap_space",
    "cpu_offload_gb", "enforce_eager", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
    "enable_chunked_prefill", "block_size", "disable_log_stats", "distributed_executor_backend", "max_seq_len_to_capture",
    "disable_custom_all_reduce", "kv_cache_memory_bytes", "compilation_config",
})


def engine_kwargs(config: TeacherSettings) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`; `engine_args` may override all but the model."""
    if "model" in config.engine_args:
        raise ConfigError("teacher engine_args: set the model with `model:`, not inside engine_args")
    # A fixed engine seed keeps unseeded requests reproducible run to run.
    base = {"model": config.model, "dtype": config.dtype, "trust_remote_code": config.trust_remote_code, "seed": 0}
    return {**base, **config.engine_args}


def sampling_kwargs(request: ChatRequest, json_field: JsonField | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` that produce samples `sample_offset`… of a request.

    vLLM's parallel sampling seeds child i with `seed + i`, the same rule as
    `ChatRequest.sample_seed`, so passing the seed of the first sample wanted
    reproduces every later one, on resume too.
    """
    params = request.params
    kwargs: dict[str, Any] = {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
    }
    seed = request.sample_seed(request.sample_offset)
    if seed is not None:
        kwargs["seed"] = seed
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if params.logprobs is not None:
        kwargs["logprobs"] = params.logprobs
    if params.json_schema is not None:
        if json_field is None:
            raise PermanentTeacherError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams")
        name, factory = json_field
        kwargs[name] = factory(json=params.json_schema)
    return kwargs


def resolve_json_field(sampling_module: Any) -> JsonField | None:
    """The structured-output keyword this vLLM understands, newest API first."""
    if hasattr(sampling_module, "StructuredOutputsParams"):
        return "structured_outputs", sampling_module.StructuredOutputsParams
    if hasattr(sampling_module, "GuidedDecodingParams"):
        return "guided_decoding", sampling_module.GuidedDecodingParams
    return None


def convert_logprobs(token_ids: Sequence[int], positions: Sequence[Any], k: int) -> list[TokenLogprob]:
    """vLLM's per-position `{token_id: Logprob}` dicts → our logprobs, top-k sorted best first.

    vLLM always includes the sampled token, so a position holds k or k+1 entries;
    the k best by logprob (rank breaking ties) are the top-k.
    """
    result = []
    for token_id, candidates in zip(token_ids, positions):
        entries = dict(candidates.items())
        if token_id not in entries:
            raise ValueError(f"vLLM returned no logprob for sampled token {token_id}")
        chosen = entries[token_id]
        ranked = sorted(entries.items(), key=lambda kv: (-kv[1].logprob, _rank(kv[1])))
        top = [TopLogprob(token=_text(lp), id=tid, logprob=lp.logprob) for tid, lp in ranked[:k]]
        result.append(TokenLogprob(token=_text(chosen), id=token_id, logprob=chosen.logprob, top=top))
    return result


def _rank(lp: Any) -> float:
    rank = getattr(lp, "rank", None)
    return float("inf") if rank is None else rank


def _text(lp: Any) -> str:
    return getattr(lp, "decoded_token", None) or ""


def to_chat_response(output: Any, params: SamplingParams, model: str, decode: Decode | None = None) -> ChatResponse:
    """A vLLM `RequestOutput` → our `ChatResponse`, completions in sample order.

    A `<think>…</think>` block in the text goes to `Completion.reasoning`; its tokens are counted
    with `decode` (the engine's tokenizer, token ids → text) or else the logprobs' token pieces, and
    left out of the logprobs (set to None where no token boundary falls on the answer's start).
    """
    samples = sorted(output.outputs, key=lambda c: getattr(c, "index", 0))
    if len(samples) != params.n:
        raise ValueError(f"vLLM returned {len(samples)} completions, {params.n} were asked for")
    completions = []
    for sample in samples:
        token_ids = list(sample.token_ids or [])
        logprobs = None
        if params.logprobs is not None:
            if sample.logprobs is None:
                raise ValueError("vLLM returned no logprobs although they were asked for")
            logprobs = convert_logprobs(token_ids, sample.logprobs, params.logprobs)
        completions.append(_split_completion(sample, token_ids, logprobs, decode))
    usage = Usage(
        prompt_tokens=len(output.prompt_token_ids or []),
        completion_tokens=sum(c.completion_tokens for c in completions),
        reasoning_tokens=sum(c.reasoning_tokens for c in completions),
    )
    return ChatResponse(completions=completions, usage=usage, model=model)


def _split_completion(sample: Any, token_ids: list[int], logprobs: list[TokenLogprob] | None, decode: Decode | None) -> Completion:
    """One vLLM sample as a Completion: its thinking apart, its logprobs for the answer's tokens only."""
    text = sample.text or ""
    if decode is not None:
        spell = functools.partial(_decode_prefix, decode, token_ids)
    elif logprobs is not None:
        spell = spelled_by([t.token for t in logprobs])
    else:
        spell = None
    split = split_generated(text, len(token_ids), spell)
    if logprobs is not None:
        logprobs = logprobs[split.reasoning_tokens :] if split.aligned else None
    return Completion(
        text=split.answer,
        finish_reason=sample.finish_reason,
        completion_tokens=len(token_ids),
        logprobs=logprobs,
        reasoning=split.reasoning,
        reasoning_tokens=split.reasoning_tokens,
    )


def _decode_prefix(decode: Decode, token_ids: list[int], n: int) -> str:
    return decode(token_ids[:n])


def _decoder(llm: Any) -> Decode | None:
    """Token ids → text with the engine's own tokenizer, as vLLM detokenizes outputs; None if it has none."""
    try:
        tokenizer = llm.get_tokenizer()
    except Exception:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class VLLMTeacher(Teacher):
    """A local vLLM engine. Batches are big (vLLM schedules them itself) and sent one at a time."""

    backend = "vllm"

    def __init__(self, config: TeacherSettings):
        super().__init__(config.model)
        self.config = config
        try:
            import vllm
            import vllm.sampling_params as sampling_module
        except ImportError as exc:
            detail = "" if exc.name == "vllm" else f" (import failed: {_one_line(exc)})"
            raise ConfigError(f"the vllm backend needs vLLM{detail}; install it with {INSTALL_HINT} on a CUDA machine") from None
        self.batch_size = config.batch_size or DEFAULT_BATCH_SIZE
        # One engine owns the GPU: concurrent generate calls would only queue behind each other.
        self.concurrency = 1
        self._tokenizer = config.engine_args.get("tokenizer") or config.model
        self._sampling_cls = vllm.SamplingParams
        self._json_field = resolve_json_field(sampling_module)
        self._lock = threading.Lock()
        kwargs = engine_kwargs(config)
        try:
            self._llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise ConfigError(f"vllm could not load {config.model!r}: {_one_line(exc)}") from exc
        self._decode = _decoder(self._llm)

    def cache_identity(self) -> dict[str, Any]:
        """Model, weights and every engine argument that changes what is generated (dtype, quantization,
        max_model_len, tokenizer, ...): another engine setup never answers from this one's cache."""
        args = engine_kwargs(self.config)
        identity: dict[str, Any] = {"backend": self.backend, "model": self.model}
        identity.update({k: v for k, v in sorted(args.items()) if k != "model" and k not in SPEED_ONLY_ARGS})
        for key in ("model", "tokenizer"):
            path = Path(str(args.get(key, ""))).expanduser()
            if path.is_dir():
                identity[f"{key}_files"] = directory_fingerprint(path)
        return identity

    @property
    def tokenizer_name(self) -> str | None:
        """The model's own tokenizer: its ids are the ones in logprobs."""
        return self._tokenizer

    async def capabilities(self) -> Capabilities:
        """vLLM supports n, logprobs and JSON-schema decoding natively."""
        return Capabilities(n=True, logprobs=True, json_schema="json_schema")

    async def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | TeacherError]:
        """Run the batch in one `LLM.chat` call; a failing request becomes a PermanentTeacherError."""
        results: list[ChatResponse | TeacherError | None] = [None] * len(requests)
        jobs: list[tuple[int, list[dict[str, str]], Any]] = []
        for i, req in enumerate(requests):
            try:
                sp = self._sampling_cls(**sampling_kwargs(req, self._json_field))
            except TeacherError as exc:
                results[i] = exc
            except Exception as exc:
                results[i] = PermanentTeacherError(f"invalid sampling parameters: {_one_line(exc)}")
            else:
                jobs.append((i, [m.model_dump() for m in req.messages], sp))
        self.stats.requests_sent += len(requests)
        if jobs:
            outputs = await asyncio.to_thread(self._run, jobs)
            for (i, _, _), out in zip(jobs, outputs):
                results[i] = self._convert(out, requests[i].params)
        final = [r if r is not None else PermanentTeacherError("no result") for r in results]
        for r in final:
            if isinstance(r, ChatResponse):
                self.stats.requests_ok += 1
                self.stats.prompt_tokens += r.usage.prompt_tokens
                self.stats.completion_tokens += r.usage.completion_tokens
                self.stats.reasoning_tokens += r.usage.reasoning_tokens
            else:
                self.stats.errors += 1
        return final

    def _run(self, jobs: list[tuple[int, list[dict[str, str]], Any]]) -> list[Any]:
        """RequestOutputs (or the exception) for each job, in order."""
        if self._llm is None:
            return [PermanentTeacherError("the vllm teacher is closed")] * len(jobs)
        with self._lock:
            try:
                # chat() pairs a list of SamplingParams one by one with the conversations.
                return list(self._chat([m for _, m, _ in jobs], [sp for _, _, sp in jobs]))
            except Exception as exc:
                if len(jobs) == 1:
                    return [exc]
            # One bad request (say, a prompt over max_model_len) fails the whole call:
            # redo them one by one so only the culprits fail.
            outputs: list[Any] = []
            for _, messages, sp in jobs:
                try:
                    outputs.extend(self._chat([messages], [sp]))
                except Exception as exc:
                    outputs.append(exc)
            return outputs

    def _chat(self, conversations: list[list[dict[str, str]]], params: list[Any]) -> list[Any]:
        outputs = self._llm.chat(conversations, params, use_tqdm=False)
        if len(outputs) != len(conversations):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(conversations)} conversations")
        return outputs

    def _convert(self, out: Any, params: SamplingParams) -> ChatResponse | TeacherError:
        if isinstance(out, TeacherError):
            return out
        if isinstance(out, BaseException):
            return PermanentTeacherError(f"vllm: {_one_line(out)}")
        try:
            return to_chat_response(out, params, self.model, self._decode)
        except Exception as exc:
            return PermanentTeacherError(f"vllm output: {_one_line(exc)}")

    async def aclose(self) -> None:
        """Drop the engine so its GPU memory can be reclaimed."""
        self._llm = None
        gc.collect()
