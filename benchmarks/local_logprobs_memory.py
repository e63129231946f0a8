"""Peak memory of one logprobs batch of the transformers teacher: the old path (output_logits) vs the recorder.

The old `_run_batch` asked generate() for `output_logits` (every step's (batch, vocab) float32
logits, kept to the end) and then took a float32 log_softmax of every step beside them: two
(steps, batch, vocab) float32 arrays. The current one records, per step, only the top-k and the
chosen token's logprob (`_LogprobRecorder`). Run by hand:

    .venv/bin/python benchmarks/local_logprobs_memory.py                # 16 rows x 128 steps, vocab 152,064
    .venv/bin/python benchmarks/local_logprobs_memory.py --steps 512    # the full shape: ~10 GB for the old path

Each variant runs in a fresh process; its peak is ru_maxrss (tracemalloc does not see torch's
CPU allocations), reported beside the peak after loading and a warm-up batch, so the difference
is what the logprobs batch itself added. The model is a 2-layer Llama (hidden 64) with Qwen2.5's
vocabulary size and a greedy answer that never ends early, so every row runs every step; the old
path's extra memory grows as rows x steps x vocab x 8 bytes. The script also checks that both
variants return the same logprobs.

Measured here (2 cores, load ~1.9 from other work; times are noisy):
    16 x 128 x 152,064: old peak 2,898 MiB (+2,375 for the batch), new 533 MiB (+40); identical logprobs
    16 x 512 x 152,064: old peak 10,048 MiB (+9,525), new 542 MiB (+49); identical logprobs
A first version of the recorder appended small per-step tensors and peaked as high as the old
path although it held no logits: glibc's heap grew a block or two per step (with
MALLOC_MMAP_THRESHOLD_=1000000 the growth went away, so it was the allocator, not live tensors).
It now fills preallocated tensors; this benchmark is what catches such a regression.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUESTIONS = ["What color is the sky?", "Hi", "What color is the grass? The grass is green.", "good bad better worse"]


def build_model(directory: Path, vocab: int) -> None:
    """A random 2-layer Llama with `vocab` output classes and the tests' tiny tokenizer (its ids < 403 all fit)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(directory))


def old_run_batch(self: Any, rows: list, max_tokens: int, stop: list[str], logprobs: int | None) -> list:
    """`TransformersTeacher._run_batch` as it was before the recorder (commit 6364240), verbatim but for imports."""
    import torch
    from transformers import LogitsProcessorList

    from synth.teachers.base import Completion, TokenLogprob, TopLogprob
    from synth.teachers.local import _RowSampler, _whole_characters, json_opening

    tok = self._tokenizer
    width = max(len(r.prompt) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r.prompt)) + r.prompt for r in rows], device=self.device)
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device)
    kwargs: dict[str, Any] = {"stop_strings": stop, "tokenizer": tok} if stop else {}
    if any(r.params.temperature > 0 for r in rows):
        kwargs["logits_processor"] = LogitsProcessorList([_RowSampler(rows, self.device)])
    with torch.inference_mode():
        out = self._model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=sorted(self._eos), return_dict_in_generate=True,
            output_logits=logprobs is not None, **kwargs,
        )  # fmt: skip
    generated = out.sequences[:, width:]
    top = None
    if logprobs is not None:
        steps = [torch.log_softmax(step.float(), dim=-1) for step in out.logits]
        chosen = torch.stack([lp.gather(1, generated[:, t : t + 1])[:, 0] for t, lp in enumerate(steps)], 1).tolist()
        tops = [lp.topk(logprobs, dim=-1) for lp in steps]
        top = (chosen, torch.stack([t.indices for t in tops], 1).tolist(), torch.stack([t.values for t in tops], 1).tolist())
    piece = functools.lru_cache(maxsize=None)(lambda token_id: tok.decode([token_id]))
    completions = []
    for b, gen_ids in enumerate(generated.tolist()):
        gen_ids = gen_ids[: next((t for t, x in enumerate(gen_ids) if x in self._eos), len(gen_ids))]
        reason = "length" if len(gen_ids) >= max_tokens else "stop"
        gen_ids, text = _whole_characters(tok, gen_ids)
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            text, reason = text[: min(cuts)], "stop"
            while gen_ids and len(tok.decode(gen_ids[:-1], skip_special_tokens=True)) >= len(text):
                gen_ids.pop()
        token_logprobs = None
        if top is not None:
            chosen, top_ids, top_vals = top
            token_logprobs = [
                TokenLogprob(token=piece(x), id=x, logprob=chosen[b][t],
                             top=[TopLogprob(token=piece(j), id=j, logprob=v) for j, v in zip(top_ids[b][t], top_vals[b][t])])
                for t, x in enumerate(gen_ids)
            ]  # fmt: skip
        text = json_opening(rows[b].params.json_schema) + text
        completions.append(Completion(text=text, finish_reason=reason, completion_tokens=len(gen_ids), logprobs=token_logprobs))
    return completions


def max_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, model_dir: Path, rows: int, steps: int, k: int, result_path: Path) -> None:
    """In a fresh process: load, warm up, run one logprobs batch, write peaks, time and logprobs as JSON."""
    import torch

    from synth.records import Message
    from synth.teachers.base import ChatRequest, SamplingParams
    from synth.teachers.config import parse_teacher_spec
    from synth.teachers.local import TransformersTeacher

    torch.set_num_threads(2)
    if variant == "old":
        TransformersTeacher._run_batch = old_run_batch  # type: ignore[method-assign]
    teacher = TransformersTeacher(parse_teacher_spec(f"hf:{model_dir}"))
    teacher.batch_size = rows

    def requests(n: int, max_tokens: int) -> list[ChatRequest]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=k)
        return [ChatRequest(messages=[Message(role="user", content=f"{QUESTIONS[i % 4]} ({i})")], params=params) for i in range(n)]

    asyncio.run(teacher.generate(requests(rows, 4)))  # loads the model, warms the allocator
    before = max_rss_mib()
    start = time.perf_counter()
    results = asyncio.run(teacher.generate(requests(rows, steps)))
    elapsed = time.perf_counter() - start
    peak = max_rss_mib()
    logprobs = [[(t.id, t.logprob, [(c.id, c.logprob) for c in t.top]) for t in r.completions[0].logprobs] for r in results]
    result_path.write_text(json.dumps({"before_mib": before, "peak_mib": peak, "seconds": elapsed, "logprobs": logprobs}))


def main() -> None:
    """Build the model once, measure each variant in its own process, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=152_064)
    ap.add_argument("--top", type=int, default=5, help="top-k logprobs per token")
    ap.add_argument("--variant", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        measure(args.variant, args.model_dir, args.rows, args.steps, args.top, args.result)
        return
    with tempfile.TemporaryDirectory(prefix="bbd-logprobs-mem-") as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args.vocab)
        figures = {}
        for variant in ("old", "new"):
            result = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", str(model_dir), "--result", str(result),
                   "--rows", str(args.rows), "--steps", str(args.steps), "--top", str(args.top)]  # fmt: skip
            subprocess.run(cmd, check=True, cwd=ROOT)
            figures[variant] = json.loads(result.read_text())
    gib = args.rows * args.steps * args.vocab * 4 / 2**30
    print(f"shape: {args.rows} rows x {args.steps} steps x vocab {args.vocab:,}, top-{args.top}; one step's logits {gib / args.steps * 1024:.1f} MiB, all steps {gib:.2f} GiB")
    for variant, f in figures.items():
        added = f["peak_mib"] - f["before_mib"]
        print(f"{variant:>4}: peak {f['peak_mib']:8.0f} MiB   after warm-up {f['before_mib']:6.0f} MiB   batch added {added:7.0f} MiB   {f['seconds']:5.1f} s")
    same = figures["old"]["logprobs"] == figures["new"]["logprobs"]
    print(f"identical logprobs (ids, values, top-k): {same}")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
