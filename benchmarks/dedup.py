"""Near-duplicate filtering at scale: 1,000,000 synthetic instructions, and MinHash vs. ROUGE-L on 10,000.

Run by hand; it prints figures (about 10 minutes on 2 quiet cores):

    .venv/bin/python benchmarks/dedup.py                      # 1M, then the 10k comparison
    .venv/bin/python benchmarks/dedup.py -n 100000 --rouge-sample 2000 --threshold 0.7

The instructions come from templates × verbs × formats × topics × constraints × audiences,
each with two extra sentences, and 10% are planted near-duplicates of an earlier one
(exact copies, case/punctuation variants, synonym swaps, word drops, and a mix), so
precision and recall are measured against a known truth. Peak memory is ru_maxrss.

The ROUGE-L baseline is Alpaca's filter (generate_instruction.py): rouge_score's
tokenizer, the ROUGE-L F-measure of each new instruction against every kept one, and a
drop when any is >= 0.7. Run with rouge_score itself that is ~135 us per pair, and pairs
grow quadratically (10,000 instructions: ~45M pairs, hours on 2 cores), so the 10,000 run
computes the same LCS bit-parallel in numpy (identical decisions, checked against
rouge_score on a prefix, which is also timed and extrapolated by pair count).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from multiprocessing import Pipe, Process
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from synth.filters.dedup import DedupSettings, Deduplicator  # noqa: E402

# -- the synthetic instructions ---------------------------------------------------------------
_W = {name: words.split("|") for name, words in {
    "verb": "write|draft|compose|create|produce|prepare|put together|come up with|design|sketch out|develop|craft",
    "fmt": "a short essay|a haiku|a limerick|a product description|a step-by-step guide|a list of tips|a tweet|a cover letter|"
           "a dialogue between two friends|a lesson plan|a news headline|a persuasive paragraph|a short story|a blog post|"
           "a recipe|a FAQ section|an email to a colleague|a speech|a riddle|a movie pitch|a quiz with five questions|"
           "a one-sentence summary|a travel itinerary|a workout plan|a job advertisement|a poem in free verse|a book review",
    "adj": "renewable|ancient|urban|digital|sustainable|medieval|quantum|tropical|industrial|rural|modern|coastal|remote|"
           "artificial|organic|financial|cultural|volcanic|arctic|electric|microscopic|public|private|global|local|nocturnal",
    "noun": "energy|bees|libraries|railways|coffee|volcanoes|bicycles|chess|glaciers|vaccines|jazz|satellites|forests|"
            "bridges|tea|robots|oceans|cheese|languages|markets|deserts|castles|whales|pottery|elections|bread|telescopes|"
            "mushrooms|rivers|cities|fonts|passwords|earthquakes|violins|spiders|airports|podcasts|museums|tides|"
            "antibiotics|compost|lighthouses|origami|submarines|ants|sleep|taxes|orchards|kites|mapmaking|wolves|"
            "sourdough|batteries|coral reefs|fireflies|skyscrapers|tattoos|yoga|comets|recycling|beekeeping|dams|"
            "wind turbines|chocolate|glass|textiles|crows|bamboo|salt|ferries|sundials|printing presses|typewriters|"
            "wetlands|hedgehogs|lanterns|canals|mosaics|perfume|radio|sailing|weaving|clocks|snow|owls|honey|tunnels|"
            "puppets|meteorites|cacti|jellyfish|kayaks|ink|silk|caves|magnets|lullabies|carpets|rice|olive oil|maps|"
            "dolphins|mirrors|helmets|fountains|pianos|feathers|algae|seashells|tornadoes|trams|ceramics|moss|parrots|"
            "spices|wool|umbrellas|keyboards|camels|pigeons|windmills|igloos|tofu|vinyl records|calculators|compasses",
    "field": "education|healthcare|agriculture|finance|tourism|sports|architecture|journalism|law|music|biology|"
             "transportation|retail|gaming|fashion|astronomy|psychology|manufacturing|cooking|diplomacy",
    "place": "Japan|rural Kenya|the Arctic|ancient Rome|Brazil|a small village|New York|the Sahara|Iceland|Mongolia|"
             "the Andes|Scandinavia|a space station|Victorian London|the Amazon|Bangladesh|Quebec|New Zealand",
    "aud": "a five-year-old|high school students|busy parents|retired engineers|first-time investors|nurses|"
           "a skeptical manager|software developers|farmers|tourists|a history teacher|beginners|chefs|city planners",
    "cons": "|| in under {n} words| using simple language| in a formal tone| with {n} bullet points| without jargon|"
            "| including two examples| in the style of a pirate| as a numbered list| in exactly {n} sentences|"
            "| with a humorous twist| ending with a question| using only short words| and cite one statistic",
    "asp": "benefits|risks|causes|consequences|advantages|drawbacks|key facts|common myths|open questions|costs",
    "sit": "planning a trip|starting a small business|writing my thesis|training for a marathon|moving to a new city|"
           "teaching a class tomorrow|preparing for an interview|renovating my kitchen|learning to code",
}.items()}
_TOPICS = ["{adj} {noun}", "the history of {noun}", "{noun} in {place}", "the role of {noun} in {field}",
           "how {noun} affect {noun2}", "{adj} {noun} and {noun2}", "the future of {adj} {noun}", "{noun} and {field}"]
_TEMPLATES = [
    "{Verb} {fmt} about {topic}{cons}.", "Please {verb} {fmt} on {topic} for {aud}{cons}.",
    "Can you {verb} {fmt} that explains {topic} to {aud}{cons}?", "I am {sit}. {Verb} {fmt} about {topic}{cons}.",
    "{Verb} {fmt} comparing {topic} with {topic2}{cons}.", "What are the main {asp} of {topic}? Answer for {aud}{cons}.",
    "Explain why {topic} matters to {aud}{cons}.", "List the {asp} of {topic}{cons}.",
    "Describe how {topic} changed after {year}{cons}.", "Summarize the debate about {topic} for {aud}{cons}.",
    "Give me {n} ideas for {fmt} about {topic}{cons}.", "Help me {verb} {fmt} on {topic}; I am {sit}{cons}.",
]
# Every instruction ends with two of these, with slots of their own, so distinct instructions rarely collide.
_EXTRAS = [" Focus on the {asp2} of {noun3}.", " Mention {place2} at least once.", " Keep it relevant to {field2} and {noun3}.",
           " Start with a question about {noun3}.", " Add a note on {adj2} {noun3} at the end.", " Avoid any mention of {noun3}.",
           " Assume the reader knows nothing about {field2}.", " Use an analogy from {noun3}.", " Refer to {place2} and {field2}.",
           " Say something about {adj2} {noun3} first."]
_SYNONYMS = {"write": "compose", "compose": "write", "create": "make", "short": "brief", "main": "key", "explains": "describes",
             "explain": "clarify", "describe": "explain", "list": "enumerate", "ideas": "suggestions", "help": "assist",
             "about": "on", "on": "about", "please": "kindly", "simple": "plain", "formal": "professional", "give": "provide",
             "matters": "is important", "comparing": "contrasting", "summarize": "sum up", "for": "to", "the": "this"}
KINDS = ["base", "exact", "case_punct", "synonym", "drop", "mixed"]


def _fill(rng: random.Random, text: str) -> str:
    w = {k: rng.choice(v) for k, v in _W.items()}
    w.update(noun2=rng.choice(_W["noun"]), noun3=rng.choice(_W["noun"]), asp2=rng.choice(_W["asp"]), adj2=rng.choice(_W["adj"]),
             place2=rng.choice(_W["place"]), field2=rng.choice(_W["field"]), n=rng.randint(2, 500), year=rng.randint(1800, 2020),
             Verb=w["verb"].capitalize())
    w["topic"] = rng.choice(_TOPICS).format(**w)
    w["topic2"] = rng.choice(_TOPICS).format(**{**w, "noun": rng.choice(_W["noun"]), "adj": rng.choice(_W["adj"])})
    w["cons"] = w["cons"].format(**w)
    first, second = rng.sample(_EXTRAS, 2)
    return (text + first + second.format(**{**w, "noun3": rng.choice(_W["noun"]), "adj2": rng.choice(_W["adj"]), "asp2": rng.choice(_W["asp"]),
                                            "place2": rng.choice(_W["place"]), "field2": rng.choice(_W["field"])}).replace("{", "{{").replace("}", "}}")).format(**w)


def _vary(rng: random.Random, text: str, kind: str) -> str:
    """A planted near-duplicate of `text`."""
    words = text.split()
    if kind in ("synonym", "mixed"):
        spots = [i for i, x in enumerate(words) if x.lower().strip(".,?;") in _SYNONYMS]
        for i in rng.sample(spots, min(len(spots), rng.randint(1, 2))):
            core = words[i].lower().strip(".,?;")
            words[i] = words[i].lower().replace(core, _SYNONYMS[core])
    if kind in ("drop", "mixed") and len(words) > 6:
        for _ in range(1 if kind == "mixed" else rng.randint(1, 2)):
            del words[rng.randrange(1, len(words))]
    text = " ".join(words)
    if kind in ("case_punct", "mixed"):
        text = rng.choice([str.lower, str.upper, str.title, str.capitalize])(text)
        text = rng.choice([text.rstrip(".?!"), text.rstrip(".?!") + "!", text.replace(",", "").replace(";", " -"), text + ".."])
    return text


def _base(seed: int, i: int) -> str:
    # Each base text has its own RNG, so a later copy regenerates it instead of the harness storing them all.
    rng = random.Random(f"{seed}:{i}")
    return _fill(rng, rng.choice(_TEMPLATES))


def instructions(n: int, seed: int = 0, dup_rate: float = 0.1):
    """Yield (text, original index or -1, kind index) for n instructions; originals precede their copies."""
    rng = random.Random(seed)
    bases: list[int] = []
    for i in range(n):
        if bases and rng.random() < dup_rate:
            kind = rng.randrange(1, len(KINDS))
            orig = rng.choice(bases)
            yield _vary(rng, _base(seed, orig), KINDS[kind]), orig, kind
        else:
            bases.append(i)
            yield _base(seed, i), -1, 0


# -- measurement ----------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scores(flags: np.ndarray, orig: np.ndarray, kind: np.ndarray) -> dict:
    """Precision/recall of the dropped items against the planted duplicates, and recall per kind."""
    planted = orig >= 0
    tp = int((flags & planted).sum())
    out = {"dropped": int(flags.sum()), "planted": int(planted.sum()),
           "precision": tp / max(1, int(flags.sum())), "recall": tp / max(1, int(planted.sum()))}
    out["recall_by_kind"] = {KINDS[k]: float(flags[kind == k].mean()) for k in range(1, len(KINDS)) if (kind == k).any()}
    return out


def run_minhash(n: int, config: DedupSettings, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, dict]:
    """Filter n generated instructions; returns what each was dropped as a duplicate of (-1: kept), truth, seconds (generation excluded) and stats."""
    orig = np.full(n, -1, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int8)
    flags = np.full(n, -1, dtype=np.int64)
    gen_seconds = 0.0

    def stream():
        nonlocal gen_seconds
        t = time.perf_counter()
        for i, (text, o, k) in enumerate(instructions(n, seed)):
            orig[i], kind[i] = o, k
            gen_seconds += time.perf_counter() - t
            yield i, text
            t = time.perf_counter()

    dedup = Deduplicator(config)
    started, cpu = time.perf_counter(), time.process_time()
    for i, found in enumerate(dedup.add_many(stream())):
        if found is not None:
            flags[i] = found.key
    total, cpu = time.perf_counter() - started, time.process_time() - cpu
    info = {"total_s": total, "cpu_s": cpu, "generate_s": gen_seconds, "stats": dedup.stats, "lsh": (dedup._lsh.b, dedup._lsh.r)}
    return flags, orig, kind, total - gen_seconds, info


def explain_errors(dup_of: np.ndarray, orig: np.ndarray, config: DedupSettings, seed: int, sample: int = 5000) -> dict:
    """Exact shingle Jaccard behind the errors: is a wrong drop (or a missed copy) near by the filter's own definition?"""
    rng = np.random.default_rng(0)
    wrong = np.flatnonzero((dup_of >= 0) & (orig < 0))
    missed = np.flatnonzero((dup_of < 0) & (orig >= 0))
    wrong = rng.choice(wrong, min(sample, len(wrong)), replace=False) if len(wrong) else wrong
    missed = rng.choice(missed, min(sample, len(missed)), replace=False) if len(missed) else missed
    pairs = [(int(i), int(dup_of[i])) for i in wrong] + [(int(i), int(orig[i])) for i in missed]
    need = {x for p in pairs for x in p}
    texts = {i: t for i, (t, _, _) in enumerate(instructions(len(dup_of), seed)) if i in need}
    d = Deduplicator(config)

    def jaccard(i: int, j: int) -> float:
        a, b = set(d.shingle_hashes(texts[i]).tolist()), set(d.shingle_hashes(texts[j]).tolist())
        return len(a & b) / max(1, len(a | b))

    wrong_near = [jaccard(i, j) >= config.threshold for i, j in pairs[: len(wrong)]]
    missed_near = [jaccard(i, j) >= config.threshold for i, j in pairs[len(wrong):]]
    return {"wrong": len(wrong), "wrong_truly_near": float(np.mean(wrong_near)) if wrong_near else 0.0,
            "missed": len(missed), "missed_truly_near": float(np.mean(missed_near)) if missed_near else 0.0}


def _rouge_worker(conn) -> None:
    """Holds a shard of the kept instructions' tokens; answers the best ROUGE-L F of a new one against them."""
    from rouge_score.rouge_scorer import _score_lcs

    kept: list[list[str]] = []
    while (msg := conn.recv()) is not None:
        op, tokens = msg
        if op == "add":
            kept.append(tokens)
        else:  # like Alpaca: every pair is scored, then the max is taken
            conn.send(max([_score_lcs(tokens, other).fmeasure for other in kept], default=0.0))


def run_rouge(texts: list[str], threshold: float, workers: int) -> tuple[np.ndarray, float]:
    """Alpaca's filter: drop an instruction whose ROUGE-L F against any kept one is >= threshold.

    Alpaca maps `_score_lcs` over every kept instruction with a process pool, re-sending them all
    each time; here each worker keeps its shard, so the pairwise work (the same) is all that is timed.
    """
    from rouge_score import rouge_scorer

    tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
    conns = []
    procs = []
    for _ in range(workers):
        parent, child = Pipe()
        proc = Process(target=_rouge_worker, args=(child,), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    flags = np.zeros(len(texts), dtype=bool)
    kept = 0
    started = time.perf_counter()
    for i, text in enumerate(texts):
        tokens = tokenizer.tokenize(text)
        for c in conns:
            c.send(("max", tokens))
        if max(c.recv() for c in conns) >= threshold:
            flags[i] = True
        else:
            conns[kept % workers].send(("add", tokens))
            kept += 1
        if i and i % 1000 == 0:
            print(f"  rouge-l: {i:,} of {len(texts):,} after {time.perf_counter() - started:,.0f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    for c, proc in zip(conns, procs):
        c.send(None)
        proc.join()
    return flags, seconds


def run_rouge_bitparallel(texts: list[str], threshold: float) -> tuple[np.ndarray, float]:
    """The same filter with the same tokens and F-measure, each new instruction scored against every kept one at once.

    LCS lengths come from Hyyrö's bit-parallel algorithm (one 64-bit word per kept instruction,
    so at most 64 tokens each), vectorised over the kept instructions with numpy; the F-measure
    is rouge_score's (2PR/(P+R)). `main` checks its decisions against rouge_score's on a prefix.
    """
    from rouge_score import rouge_scorer

    tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
    vocab: dict[str, int] = {}
    rows = np.full((len(texts), 64), -1, dtype=np.int32)  # kept instructions' token ids, padded
    lens = np.zeros(len(texts), dtype=np.int64)
    flags = np.zeros(len(texts), dtype=bool)
    kept = 0
    started = time.perf_counter()
    for i, text in enumerate(texts):
        x = [vocab.setdefault(t, len(vocab)) for t in tokenizer.tokenize(text)]
        if len(x) > 64:
            raise ValueError(f"instruction {i} has {len(x)} tokens; the bit-parallel LCS handles 64")
        if kept and x:
            y, n = rows[:kept], lens[:kept]
            v = np.full(kept, np.uint64(2**64 - 1))
            for tok in x:
                match = np.packbits(y == tok, axis=1, bitorder="little").view(np.uint64)[:, 0]
                u = v & match
                v = (v + u) | (v - u)
            mask = np.where(n >= 64, np.uint64(2**64 - 1), (np.uint64(1) << n.astype(np.uint64)) - np.uint64(1))
            lcs = n - np.bitwise_count(v & mask).astype(np.int64)
            with np.errstate(invalid="ignore", divide="ignore"):
                p, r = lcs / n, lcs / len(x)  # as rouge_score: precision over the kept one, recall over the new one
                f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
            if f.max() >= threshold:
                flags[i] = True
                continue
        if x:
            rows[kept, : len(x)] = x
            lens[kept] = len(x)
            kept += 1
    return flags, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000, help="instructions to filter (default 1,000,000; 0 skips this part)")
    ap.add_argument("--rouge-sample", type=int, default=10_000, help="instructions for the ROUGE-L comparison (0 skips it)")
    ap.add_argument("--rouge-threshold", type=float, default=0.7)
    ap.add_argument("--rouge-prefix", type=int, default=2000, help="instructions also run through rouge_score itself (slow: pairs grow quadratically)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the ROUGE-L filter (Alpaca uses a pool)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic instructions")
    for name, field in DedupSettings.model_fields.items():
        if field.annotation in (int, float) and name != "seed":
            ap.add_argument("--" + name.replace("_", "-"), type=field.annotation, default=field.default, help=field.description)
    args = ap.parse_args()
    config = DedupSettings(**{k: getattr(args, k) for k in DedupSettings.model_fields if hasattr(args, k)})
    print(f"config: {config.model_dump()}")
    sample = [t for t, _, _ in instructions(2000, args.data_seed)]
    print(f"instructions average {sum(len(t.split()) for t in sample) / len(sample):.1f} words; e.g. {sample[0]!r}")

    if args.n:
        big(args, config)
    if args.rouge_sample:
        versus_rouge(args, config)


def big(args: argparse.Namespace, config: DedupSettings) -> None:
    """The large run: time, memory, precision and recall."""
    base_rss = peak_rss_mib()
    dup_of, orig, kind, seconds, info = run_minhash(args.n, config, args.data_seed)
    rss = peak_rss_mib()
    s = scores(dup_of >= 0, orig, kind)
    print(f"\n== MinHash LSH on {args.n:,} instructions ==")
    print(f"LSH bands x rows: {info['lsh'][0]} x {info['lsh'][1]}")
    print(f"dedup time {seconds:.1f} s ({args.n / seconds:,.0f}/s); generating them took a further {info['generate_s']:.1f} s; "
          f"CPU time of both {info['cpu_s']:.1f} s (wall {info['total_s']:.1f} s; the gap is other processes on the machine)")
    print(f"peak RSS {rss:,.0f} MiB (the interpreter and imports before it: {base_rss:,.0f} MiB)")
    print(info["stats"].line())
    print(f"planted duplicates {s['planted']:,}, dropped {s['dropped']:,}: precision {s['precision']:.4f}, recall {s['recall']:.4f}")
    print("recall by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in s["recall_by_kind"].items()))
    e = explain_errors(dup_of, orig, config, args.data_seed)
    print(f"errors checked by exact shingle Jaccard (sampled): of the unplanted items dropped, {e['wrong_truly_near']:.1%} are within "
          f"{config.threshold} of what they matched (near-identical instructions the generator made by chance, not filter errors); "
          f"of the planted copies missed, {e['missed_truly_near']:.1%} were within it (LSH misses), the rest are beyond the threshold")


def versus_rouge(args: argparse.Namespace, config: DedupSettings) -> None:
    """MinHash against the Alpaca-style ROUGE-L filter on a smaller stream: time ratio and agreement."""
    m, prefix = args.rouge_sample, min(args.rouge_prefix, args.rouge_sample)
    texts, o, k = zip(*instructions(m, args.data_seed + 1))
    texts, o, k = list(texts), np.array(o), np.array(k)

    def minhash(items: list[str]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        d = Deduplicator(config)
        flags = np.array([found is not None for found in d.add_many(enumerate(items))])
        return flags, time.perf_counter() - started

    mh, mh_s = minhash(texts)
    bp, bp_s = run_rouge_bitparallel(texts, args.rouge_threshold)
    rs, rs_s = run_rouge(texts[:prefix], args.rouge_threshold, args.workers)
    mh_prefix_s = minhash(texts[:prefix])[1]
    same = bool((rs == bp[:prefix]).all())
    # The pairwise filter's work is one LCS per (new, kept) pair.
    kept_before = np.concatenate(([0], np.cumsum(~bp)[:-1]))
    pairs, pairs_prefix = int(kept_before.sum()), int(kept_before[:prefix].sum())
    print(f"\n== {m:,} instructions: MinHash LSH vs Alpaca-style ROUGE-L >= {args.rouge_threshold} ==")
    for name, f, t in (("minhash", mh, mh_s), ("rouge-l", bp, bp_s)):
        sc = scores(f, o, k)
        print(f"{name:8s} {t:9.2f} s  dropped {sc['dropped']:5d}  precision {sc['precision']:.4f}  recall {sc['recall']:.4f}  "
              + " ".join(f"{a}={b:.2f}" for a, b in sc["recall_by_kind"].items()))
    print(f"rouge-l above: every new instruction against every kept one ({pairs:,} pairs), LCS bit-parallel in numpy; "
          f"its decisions equal rouge_score's on the first {prefix:,}: {same}")
    print(f"rouge_score itself (Alpaca's code path, {args.workers} processes) on the first {prefix:,}: {rs_s:.1f} s "
          f"({pairs_prefix:,} pairs, {rs_s / max(1, pairs_prefix) * 1e6 * args.workers:.0f} us per pair per process) "
          f"vs MinHash {mh_prefix_s:.2f} s: {rs_s / mh_prefix_s:,.0f}x")
    est = rs_s * pairs / max(1, pairs_prefix)
    print(f"time ratio on {m:,}: bit-parallel rouge-l / minhash {bp_s / mh_s:,.1f}x; rouge_score (estimated from the "
          f"prefix by pair count: {est:,.0f} s) / minhash {est / mh_s:,.0f}x")
    print(f"agreement on keep/drop: {(mh == bp).mean():.4f} (both drop {int((mh & bp).sum())}, "
          f"only minhash {int((mh & ~bp).sum())}, only rouge-l {int((~mh & bp).sum())})")

if __name__ == "__main__":
    main()
