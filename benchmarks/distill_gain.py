"""Proof that distillation works: how much of the teacher-student gap SFT, KD and DPO close.

With the embedded teacher (SmolLM2-135M-Instruct), a derived half-depth student, a few hundred
teacher-labeled GSM8K problems and held-out problems the student never trained on, this prints,
for the student before training, after SFT, after top-k KD (the same data and steps as SFT) and
after DPO (from the SFT student; chosen = the teacher's answer, rejected = the untrained
student's own greedy answer to the same prompt): per-token NLL of the teacher's held-out answers
under each model (the teacher's own NLL is the floor), agreement with the teacher's final answers,
and the fraction of the NLL gap closed. Targets: SFT closes >= 50 % of the gap; KD >= SFT.

Everything goes through the `distill` commands as two recipes (written under --work), so a rerun
skips what is done and every teacher answer is cached. Run by hand (about an hour on 2 CPU cores):

    .venv/bin/python benchmarks/distill_gain.py                 # 200 training problems, 24 held out
    .venv/bin/python benchmarks/distill_gain.py --train 64 --heldout 8 --steps 16   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT / "data" / "gsm8k" / "train.jsonl"
DEMOS = ROOT / "data" / "gsm8k" / "demonstrations.jsonl"
HELDOUT_START = 7000  # the last ~470 problems; --train takes the first N, demonstrations are lines 7463 and 7470


def label_and_train(args: argparse.Namespace) -> dict:
    """Stage list 1: teacher labels with top-k logprobs, a half-depth student, SFT and KD on the same data.

    Every greedy teacher answer is kept (keep: everything), cut off at max_tokens or not: what is
    distilled is the teacher's output distribution, which eval measures on held-out answers the same way.
    """
    w = args.work
    common = {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr, "max_length": args.max_length, "seed": 0}
    return {
        "name": "distill_gain",
        "work_dir": str(w),
        "teacher": "embedded",
        "stages": [
            {"name": "label", "command": "label", "input": str(GSM8K), "output": f"{w}/labeled/data.jsonl", "limit": args.train,
             "n": 1, "temperature": 0.0, "max_tokens": args.max_tokens, "logprobs": args.logprobs, "keep": "everything",
             "reference_field": "", "demonstrations": str(DEMOS)},
            {"name": "student", "command": "student derive", "from": "embedded", "keep": 0.5, "out": f"{w}/student-before"},
            {"name": "sft", "command": "train sft", "model": "@student", "data": "@label", "output_dir": f"{w}/student-sft", **common},
            {"name": "kd", "command": "train kd", "model": "@student", "data": "@label", "output_dir": f"{w}/student-kd",
             "alpha": args.alpha, "temperature": args.kd_temperature, "divergence": args.divergence, **common},
        ],
    }  # fmt: skip


def prefer_and_evaluate(args: argparse.Namespace, pairs: Path) -> dict:
    """Stage list 2: DPO from the SFT student on (teacher, untrained student) pairs, then one evaluation of all."""
    w = args.work
    models = [f"{w}/student-before", f"{w}/student-sft", f"{w}/student-kd", f"{w}/student-dpo"]
    return {
        "name": "distill_gain_dpo",
        "work_dir": str(w),
        "teacher": "embedded",
        "stages": [
            {"name": "dpo", "command": "train dpo", "model": f"{w}/student-sft", "data": str(pairs), "output_dir": f"{w}/student-dpo",
             "max_steps": args.dpo_steps, "batch_size": max(1, args.batch_size // 2), "grad_accum": 2, "learning_rate": args.dpo_lr,
             "beta": args.beta, "max_length": args.max_length, "seed": 0},
            {"name": "eval", "command": "eval", "students": models, "before": models[0], "prompts": str(GSM8K),
             "skip": HELDOUT_START, "limit": args.heldout, "max_new_tokens": args.max_tokens, "demonstrations": str(DEMOS),
             "output_dir": f"{w}/eval"},
        ],
    }  # fmt: skip


def run_recipe(recipe: dict, path: Path) -> None:
    """Write the recipe and run it with `distill run` (finished stages are skipped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    subprocess.run([sys.executable, "-m", "distill", "run", str(path)], check=True, cwd=ROOT)


def write_pairs(labeled: Path, student: Path, out: Path, max_new_tokens: int, batch_size: int) -> int:
    """Preference pairs: the teacher's answer over the untrained student's greedy answer to the same prompt."""
    if out.is_file():
        return sum(1 for _ in out.open())
    from trainers.eval_metrics import generate_greedy, load_local

    rows = [json.loads(line) for line in labeled.open()]
    model, tokenizer = load_local(student, "cpu", None)
    prompts = [r["prompt"] for r in rows]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    tmp = out.with_suffix(".partial")
    kept = 0
    with tmp.open("w") as fh:
        for r, rejected in zip(rows, answers):
            chosen = r["completion"][0]["content"]
            if rejected.strip() == chosen.strip():
                continue  # nothing to prefer
            pair = {"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": rejected}]}
            fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
            kept += 1
    os.replace(tmp, out)
    return kept


def report(eval_json: Path) -> None:
    """Print the table the issue asks for from eval.json."""
    result = json.loads(eval_json.read_text())
    teacher = result["teacher"]
    names = {"student-before": "before", "student-sft": "SFT", "student-kd": "KD", "student-dpo": "SFT+DPO"}
    print(f"\nheld-out problems: {result['prompts']} (GSM8K lines {HELDOUT_START + 1}..); teacher NLL floor: {teacher['nll']:.4f} nats/token")
    print(f"{'student':<10} {'NLL':>8} {'gap closed':>11} {'agreement':>10} {'answered':>9}")
    for m in result["models"]:
        label = names.get(Path(m["path"]).name, m["name"])
        gap = m.get("gap_closed")
        gap_text = "-" if gap is None else f"{100 * gap:.1f} %"
        print(f"{label:<10} {m['nll']:>8.4f} {gap_text:>11} {_pct(m.get('agreement')):>10} {_pct(m.get('answered')):>9}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def main() -> None:
    """Run both recipes (resuming what is done), build the pairs between them, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench" / "distill_gain")
    p.add_argument("--train", type=int, default=200, help="teacher-labeled training problems")
    p.add_argument("--heldout", type=int, default=24, help="held-out problems (from GSM8K line 7001 on)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-length", type=int, default=640, help="training sequence length (the prompt has two worked examples)")
    p.add_argument("--logprobs", type=int, default=20)
    p.add_argument("--steps", type=int, default=60, help="SFT and KD optimizer steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="KD: weight of the hard-label cross-entropy")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--divergence", default="forward")
    p.add_argument("--dpo-steps", type=int, default=24)
    p.add_argument("--dpo-lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    args = p.parse_args()
    args.work = args.work.resolve()
    start = time.monotonic()
    run_recipe(label_and_train(args), args.work / "label_and_train.yaml")
    pairs = args.work / "pairs.jsonl"
    n = write_pairs(args.work / "labeled" / "data.jsonl", args.work / "student-before", pairs, args.max_tokens, args.batch_size)
    print(f"{n} preference pairs in {pairs}")
    run_recipe(prefer_and_evaluate(args, pairs), args.work / "prefer_and_evaluate.yaml")
    report(args.work / "eval" / "eval.json")
    print(f"\nwall time {time.monotonic() - start:.0f} s; report: {args.work / 'eval' / 'report.md'}")


if __name__ == "__main__":
    main()
