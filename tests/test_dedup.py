"""Exact and near-duplicate filtering on planted sets: copies and light paraphrases go, distinct tasks stay."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash

from synth.filters.dedup import (
    DedupSettings,
    Deduplicator,
    Shingler,
    dedup_texts,
    normalize,
    tokenize,
)

DISTINCT_EN = [
    "Write a short poem about the sea at night, for children.",
    "Explain how vaccines train the immune system, in simple terms.",
    "List five tips for keeping houseplants alive in winter.",
    "Translate the following sentence into French: the train leaves at noon.",
    "Summarize the causes of the French Revolution in three bullet points.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main differences between a virus and a bacterium?",
    "Draft a polite email asking a colleague to review my report by Friday.",
    "Classify the sentiment of this review as positive or negative: the food was cold.",
    "Suggest a name for a bakery that specialises in sourdough bread.",
]
# Each planted item is (text, index of the DISTINCT_EN item it duplicates).
PLANTED_EN = [
    ("Write a short poem about the sea at night, for children.", 0),  # exact copy
    ("WRITE A SHORT POEM ABOUT THE SEA AT NIGHT FOR CHILDREN", 0),  # case and punctuation
    ("  explain how vaccines train the immune system in simple terms!! ", 1),  # spacing, case, punctuation
    ("List five tips for keeping your houseplants alive in winter.", 2),  # one word added
    ("Summarize the causes of the French Revolution in three points.", 4),  # one word dropped
    ("Write a Python function that checks whether a given string is a palindrome.", 5),  # one word added
    ("What are the main differences between a virus and a bacteria?", 6),  # one word changed
    ("Draft a polite email asking a coworker to review my report by Friday.", 7),  # synonym swap
]
DISTINCT_ZH = [
    "写一首关于秋天落叶的短诗，适合小学生朗读。",
    "解释一下光合作用的基本过程，用通俗的语言。",
    "列出五个提高睡眠质量的小建议。",
    "把下面这句话翻译成英文：明天上午十点开会。",
    "比较一下高铁和飞机在长途旅行中的优缺点。",
]
PLANTED_ZH = [
    ("写一首关于秋天落叶的短诗，适合小学生朗读。", 0),  # exact copy
    ("写一首关于秋天落叶的短诗 适合小学生朗读!", 0),  # punctuation
    ("请解释一下光合作用的基本过程，用通俗的语言。", 1),  # one character added
    ("列出五个提高睡眠质量的建议。", 2),  # two characters dropped
]


def test_normalize_and_tokenize():
    assert normalize("  Hello,   WORLD!  ") == "hello world"
    assert normalize("Ｆｕｌｌ－ｗｉｄｔｈ") == "full width"  # NFKC folds full-width forms, the dash is punctuation
    assert normalize("你好，世界！") == "你好 世界"
    assert tokenize("write a poem") == ["write", "a", "poem"]
    assert tokenize("用 python 写一个函数") == ["用", "python", "写", "一", "个", "函", "数"]


@pytest.mark.parametrize("distinct,planted", [(DISTINCT_EN, PLANTED_EN), (DISTINCT_ZH, PLANTED_ZH)], ids=["en", "zh"])
def test_planted_duplicates_are_removed_and_distinct_items_kept(distinct, planted):
    d = Deduplicator()
    assert all(d.add(f"d{i}", text) is None for i, text in enumerate(distinct)), "distinct instructions must all be kept"
    for text, source in planted:
        assert d.add("copy", text) == f"d{source}", f"{text!r} should duplicate d{source}"
    assert d.stats.kept == len(distinct) and d.stats.exact + d.stats.near == len(planted)
    assert len(d) == len(distinct)


def test_exact_and_near_are_told_apart_with_reasons():
    d = Deduplicator()
    d.add("a", "Write a short poem about the sea at night, for children.")
    exact = d.check("write a short poem about the sea at night for children")
    near = d.check("Write a short poem about the sea at night, for young children.")
    assert exact.kind == "exact" and exact.similarity == 1.0 and "equal after normalisation" in exact.describe()
    assert near.kind == "near" and 0.6 <= near.similarity < 1.0 and near.describe().startswith("duplicate: near a")
    assert len(d) == 1, "check never accepts"


def test_ignore_skips_the_given_keys():
    d = Deduplicator()
    d.add("parent", "Explain how vaccines train the immune system.")
    text = "Explain how vaccines train the immune system, in three steps."
    assert d.check(text).key == "parent"
    assert d.check(text, ignore={"parent"}) is None
    assert d.check("Explain how vaccines train the immune system.", ignore={"parent"}) is None


def test_threshold_and_switches():
    a, b = "List five tips for keeping houseplants alive in winter.", "List five tips for keeping cacti alive in summer."
    sim = Shingler().similarity(a, b)
    assert 0.2 < sim < 0.6
    assert Deduplicator(DedupSettings(threshold=sim - 0.01)).add("x", a) is None
    strict = Deduplicator(DedupSettings(threshold=sim - 0.01))
    strict.add("x", a)
    assert strict.add("y", b) == "x"
    no_near = Deduplicator(DedupSettings(near=False))
    no_near.add("x", a)
    assert no_near.add("y", a + " Please.") is None and no_near.add("z", a.upper()) == "x"
    no_exact = Deduplicator(DedupSettings(exact=False))
    no_exact.add("x", a)
    assert no_exact.offer("z", a.upper()).kind == "near"


def test_signature_equals_datasketch_minhash():
    d = Deduplicator(DedupSettings(num_perm=64, seed=3))
    for text in ("Write a poem about the sea.", "写一首关于大海的诗", "hi", "请用 Python 写一个函数"):
        m = MinHash(num_perm=64, seed=3, hashfunc=lambda x: x)
        m.update_batch([int(x) for x in d.shingle_hashes(text)])
        assert np.array_equal(m.hashvalues, d.signature(text)), text
    assert d.signature("?!") is None and d.shingle_hashes("...").size == 0


def test_batched_equals_one_by_one_and_is_deterministic():
    texts = [t for t, _ in PLANTED_EN] + DISTINCT_EN + [t for t, _ in PLANTED_ZH] + DISTINCT_ZH + ["", "!!!", "ok"]
    one = Deduplicator()
    singles = [one.add(i, t) for i, t in enumerate(texts)]
    many = Deduplicator()
    batched = [None if f is None else f.key for f in many.add_many(enumerate(texts), batch=4)]
    assert singles == batched
    kept, stats = dedup_texts(texts)
    assert kept == [i for i, f in enumerate(singles) if f is None] and stats.seen == len(texts)
    assert many.add("empty again", "") == texts.index(""), "texts without tokens are deduplicated exactly"


def test_a_thousand_random_instructions_are_all_kept_and_their_copies_dropped():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(1000)]
    d = Deduplicator()
    assert sum(f is None for f in d.add_many(enumerate(texts))) == 1000
    dropped = sum(d.add(("copy", i), t.upper() + "!") is not None for i, t in enumerate(texts[:200]))
    assert dropped == 200
