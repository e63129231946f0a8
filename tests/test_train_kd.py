"""Top-k KD: the sparse loss against dense references, row alignment, the tokenizer check, training on a tiny Llama; GKD."""

from __future__ import annotations

import json
import random

import pytest
import torch

from synth.errors import ConfigError, InputError
from tests.tiny_models import (
    COLORS,
    THINGS,
    make_tiny_llama,
    provenance,
    write_sft_records,
)
from trainers.kd_loss import kd_loss, logit_mse, sparse_divergence, sparse_logit_mse


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread while this module runs: on a shared, loaded CPU, OpenMP threads spin against each other (15x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- the loss


def dense(student, teacher, kind, temperature, beta=0.5):
    """Reference: the divergence between full softmaxes at temperature T, over the whole vocabulary."""
    p, q = torch.log_softmax(teacher / temperature, -1), torch.log_softmax(student / temperature, -1)
    if kind == "forward":
        return (p.exp() * (p - q)).sum(-1)
    if kind == "reverse":
        return (q.exp() * (q - p)).sum(-1)
    m = torch.log(beta * p.exp() + (1 - beta) * q.exp())
    return beta * (p.exp() * (p - m)).sum(-1) + (1 - beta) * (q.exp() * (q - m)).sum(-1)


def random_case(vocab=40, k=None, seed=0):
    """Student logits, teacher logits, and the teacher's top-k (all of it when k is None) in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, vocab, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(3, 5, vocab, generator=g, dtype=torch.float64) * 3
    logprobs = torch.log_softmax(teacher, -1)
    ids = logprobs.topk(k or vocab, -1).indices
    ids = ids.gather(-1, torch.stack([torch.randperm(ids.shape[-1], generator=g) for _ in range(15)]).view(3, 5, -1))
    return student, teacher, ids, logprobs.gather(-1, ids)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind,beta", [("forward", 0.0), ("reverse", 1.0), ("jsd", 0.5), ("jsd", 0.2)])
def test_sparse_equals_dense_when_k_is_the_vocabulary(kind, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, ids, lps = random_case()
    ours, has = sparse_divergence(student, ids, lps, kind, temperature, beta if kind == "jsd" else 0.5)
    assert has.all()
    torch.testing.assert_close(ours, dense(student, teacher, kind, temperature, beta), atol=1e-5, rtol=0)
    # TRL's own GKD loss (beta 0: forward KL, 1: reverse KL) agrees too.
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature, reduction="none").sum(-1)
    torch.testing.assert_close(ours, trl, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_top_k_with_a_tail_bucket_is_the_coarse_grained_divergence(kind):
    student, teacher, ids, lps = random_case(k=6, seed=1)
    # Reference: coarse-grain both full distributions (T=1) onto S + tail, then temper the k+1 buckets.
    def coarse(logits):
        p = torch.softmax(logits, -1)
        on_s = p.gather(-1, ids)
        return torch.log(torch.cat([on_s, 1 - on_s.sum(-1, keepdim=True)], -1))

    t, s = coarse(teacher) / 2.0, coarse(student) / 2.0
    ours, _ = sparse_divergence(student, ids, lps, kind, 2.0)
    torch.testing.assert_close(ours, dense(s, t, kind, 1.0), atol=1e-5, rtol=0)
    # A student equal to the teacher scores zero at any temperature, tail included.
    same, _ = sparse_divergence(teacher, ids, lps, kind, 2.0)
    assert same.abs().max() < 1e-6


def test_alpha_one_is_plain_cross_entropy_and_gradients_flow():
    student, _, ids, lps = random_case(k=5, seed=2)
    student = student.float().requires_grad_()
    labels = torch.randint(0, 40, (3, 5))
    labels[0, :2] = -100
    ids[1, 3] = -1  # a position without candidates: CE only, no NaN
    ce = torch.nn.functional.cross_entropy(student[labels != -100], labels[labels != -100])
    torch.testing.assert_close(kd_loss(student, labels, ids, lps.float(), alpha=1.0), ce)
    loss = kd_loss(student, labels, ids, lps.float(), alpha=0.3, temperature=2.0, kind="jsd")
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    d, has = sparse_divergence(student.detach(), ids, lps.float(), "jsd", 2.0)
    expected = 0.3 * ce + 0.7 * 4.0 * (d * (labels != -100)).sum() / (labels != -100).sum()
    torch.testing.assert_close(loss, expected)
    assert not has[1, 3] and d[1, 3] == 0


def test_logit_mse_dense_and_its_top_k_form():
    student, teacher, ids, lps = random_case(seed=3)
    torch.testing.assert_close(logit_mse(student, student + 1.5), torch.full((3, 5), 2.25, dtype=torch.float64))
    # With k = vocab, the centred top-k form is the dense MSE of centred logits; it ignores log Z.
    centred = logit_mse(student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True))
    torch.testing.assert_close(sparse_logit_mse(student, ids, lps)[0], centred)


# ---------------------------------------------------------------- tiny models and records


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A sharpened teacher (peaked distributions), a different student, and a student with another vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("kd")
    teacher = make_tiny_llama(root / "teacher", seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(teacher))
    model.model.norm.weight.data *= 12  # larger logits: a teacher with opinions
    model.save_pretrained(str(teacher))
    student = make_tiny_llama(root / "student", seed=1)
    other = make_tiny_llama(root / "other", seed=2)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["zebra"])
    tok.save_pretrained(str(other))
    return {"teacher": teacher, "student": student, "other": other}


def write_kd_records(path, teacher_dir, count=16, k=8, strings=False, messages=False):
    """Toy records with the teacher's real top-k at each completion token (ids, or strings like an HTTP backend)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.kd_data import completion_ids

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    with path.open("w") as fh:
        for i in range(count):
            t, c = THINGS[i % len(THINGS)], COLORS[(i * 3) % len(COLORS)]
            prompt = [{"role": "user", "content": f"What color is the {t}?"}]
            completion = [{"role": "assistant", "content": f"The {t} is {c}."}]
            head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            ids = completion_ids(tok, prompt, completion)
            with torch.no_grad():
                logits = model(torch.tensor([list(head) + ids])).logits[0, len(head) - 1 : len(head) - 1 + len(ids)]
            top = torch.log_softmax(logits, -1).topk(k, -1)
            pieces = [tok.decode([j]) for j in ids]
            soft = {"tokenizer": str(teacher_dir), "tokens": pieces, "top_logprobs": top.values.tolist()}
            if strings:
                soft.update(tokenizer=None, top_tokens=[[tok.decode([j]) for j in row] for row in top.indices.tolist()])
            else:
                soft.update(token_ids=ids, top_ids=top.indices.tolist())
            shape = {"messages": prompt + completion} if messages else {"prompt": prompt, "completion": completion}
            fh.write(json.dumps({"kind": "sft", "id": f"k{i}", "provenance": provenance(i), **shape, "soft_labels": soft}) + "\n")
    return path


def kd_settings(model, data, out, **kw):
    from trainers.settings import KDSettings

    base = dict(model=str(model), data=data, output_dir=out, max_steps=2, learning_rate=3e-3, warmup_ratio=0, batch_size=4, max_length=64, alpha=0.0)
    return KDSettings(**{**base, **kw})


def per_row_kl(trainer, rows):
    """Forward KL per row (by id) for rows collated in the given order, batches of 3."""
    model = trainer.model.eval()
    out = {}
    for b in range(0, len(rows), 3):
        chunk = rows[b : b + 3]
        batch = trainer.data_collator(chunk)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        d, has = sparse_divergence(logits, batch["kd_ids"][:, 1:], batch["kd_logprobs"][:, 1:])
        for row, value, n in zip(chunk, d.sum(-1), has.sum(-1)):
            out[row["id"]] = (value / n).item()
    return out


# ---------------------------------------------------------------- alignment and checks


def test_rows_stay_aligned_when_shuffled_and_a_copy_of_the_teacher_scores_zero(models, tmp_path):
    from trainers.kd import build_trainer

    data = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 10, messages=True)
    trainer, _, note = build_trainer(kd_settings(models["teacher"], data, tmp_path / "o"))
    assert "vocabulary hash" in note
    rows = [dict(r) for r in trainer.train_dataset]
    assert len(rows) == 10
    # The student IS the teacher: zero divergence at every labelled position means every label sits where it belongs.
    exact = per_row_kl(trainer, rows)
    assert max(exact.values()) < 1e-4, exact
    trainer, _, _ = build_trainer(kd_settings(models["student"], data, tmp_path / "o2"))
    in_order = per_row_kl(trainer, rows)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    again = per_row_kl(trainer, shuffled)  # other batch mates, other padding
    assert min(in_order.values()) > 0.05
    for key, value in in_order.items():
        assert again[key] == pytest.approx(value, abs=1e-5), key


def test_chunked_loss_equals_the_full_logits_loss(models, tmp_path):
    from trainers.kd import build_trainer

    data = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 6)
    losses, grads = [], []
    for chunk in (0, 7):  # 7: several chunks, the last one partial
        cfg = kd_settings(models["student"], data, tmp_path / f"o{chunk}", chunk_size=chunk, alpha=0.3, temperature=2.0, divergence="jsd")
        trainer, _, _ = build_trainer(cfg)
        assert trainer.kd_chunked == (chunk > 0)
        batch = trainer.data_collator([dict(r) for r in trainer.train_dataset])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(trainer.model.model.embed_tokens.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_string_candidates_map_to_the_teachers_ids(models, tmp_path):
    from transformers import AutoTokenizer

    from trainers.kd_data import read_soft_labels

    tok = AutoTokenizer.from_pretrained(str(models["student"]))
    by_id = read_soft_labels(write_kd_records(tmp_path / "ids.jsonl", models["teacher"], 4), tok, 64)
    by_str = read_soft_labels(write_kd_records(tmp_path / "str.jsonl", models["teacher"], 4, strings=True), tok, 64)
    assert by_str.tokenizers == {None}
    # 128 byte tokens all decode to U+FFFD: those candidates cannot be told apart and go to the tail (-1).
    ambiguous = torch.tensor([tok.decode([i]) == "\ufffd" for i in range(len(tok))])
    unmapped = 0
    for key, row in by_id.rows.items():
        expected = row.top_ids.copy()
        expected[ambiguous[torch.from_numpy(row.top_ids).long()].numpy()] = -1
        assert (by_str.rows[key].top_ids == expected).all()
        assert by_str.rows[key].token_ids is None
        unmapped += int((expected < 0).sum())
    assert by_str.unmapped == unmapped


def test_rows_whose_tokens_differ_are_skipped_and_counted(models, tmp_path):
    from trainers.kd import build_trainer

    path = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 6)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[2]["soft_labels"]["token_ids"][1] += 1  # the teacher "generated" another token here
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    trainer, _, _ = build_trainer(kd_settings(models["student"], path, tmp_path / "o"))
    assert len(trainer.train_dataset) == 5
    assert trainer.kd_summary()["kd_rows_train_tokens_differ"] == 1
    for x in lines:
        x["soft_labels"]["token_ids"][0] += 1
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(InputError, match="no train row can use its soft labels.*tokens differ"):
        build_trainer(kd_settings(models["student"], path, tmp_path / "o2"))


def test_a_student_with_another_tokenizer_is_refused(models, tmp_path):
    from trainers.kd import train

    data = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 4)
    with pytest.raises(ConfigError, match=r"student's tokenizer \(.*other.*\) is not the teacher's \(.*teacher"):
        train(kd_settings(models["other"], data, tmp_path / "o"))
    with pytest.raises(InputError, match="no record has soft_labels"):
        train(kd_settings(models["student"], write_sft_records(tmp_path / "plain.jsonl", 4), tmp_path / "o"))


def test_kd_learns_the_last_assistant_turn_so_assistant_only_loss_stays_on(tmp_path):
    with pytest.raises(ValueError, match="assistant_only_loss must stay true"):
        kd_settings("m", tmp_path / "d.jsonl", tmp_path / "kd", assistant_only_loss=False)


def test_the_embedded_vocabulary_hash_is_the_known_one():
    from transformers import AutoTokenizer

    from synth.teachers.embedded import EMBEDDED_TOKENIZER_NAME, embedded_model_dir
    from trainers.kd_data import KNOWN_VOCABS, vocab_fingerprint

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()), local_files_only=True)
    assert vocab_fingerprint(tok) == KNOWN_VOCABS[EMBEDDED_TOKENIZER_NAME]


# ---------------------------------------------------------------- training


def test_kd_lowers_the_kl_to_the_teacher_and_the_model_reloads(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainers.common import train_and_save
    from trainers.kd import build_trainer

    data = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 16)
    cfg = kd_settings(models["student"], data, tmp_path / "student", max_steps=12, batch_size=8, alpha=0.2, temperature=2.0,
                      learning_rate=1e-2)  # fmt: skip
    trainer, tokenizer, _ = build_trainer(cfg)
    before = trainer.evaluate(trainer.train_dataset)["eval_kd_kl"]
    result = train_and_save(trainer, cfg, tokenizer, trainer.kd_summary())
    after = trainer.evaluate(trainer.train_dataset)["eval_kd_kl"]
    assert after < 0.5 * before, (before, after)
    assert result.metrics["kd_rows_train_ok"] == 16
    history = json.loads((cfg.output_dir / "metrics.json").read_text())["history"]
    assert "kd_divergence" in history[0] and "kd_kl" in history[0]
    assert AutoModelForCausalLM.from_pretrained(str(cfg.output_dir)).config.num_hidden_layers == 2


def test_distill_train_kd_from_the_command_line(models, tmp_path):
    from distill.cli import main

    data = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 4)
    out = tmp_path / "cli"
    code = main(["train", "kd", "--model", str(models["student"]), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--divergence", "jsd", "--beta", "0.3"])  # fmt: skip
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["final"]["train_loss"] > 0
    assert (out / "config.json").is_file()


def test_gkd_lowers_its_divergence_to_a_local_teacher(models, tmp_path):
    from trainers.gkd import train
    from trainers.settings import GKDSettings

    data = write_sft_records(tmp_path / "sft.jsonl", 8)
    cfg = GKDSettings(model=str(models["student"]), teacher_model=str(models["teacher"]), data=data, output_dir=tmp_path / "gkd",
                      max_steps=8, learning_rate=1e-2, batch_size=8, max_length=64, lmbda=0.0, beta=0.0, max_new_tokens=8)  # fmt: skip
    train(cfg)
    losses = [row["loss"] for row in json.loads((cfg.output_dir / "metrics.json").read_text())["history"] if "loss" in row]
    assert sum(losses[-2:]) < 0.85 * sum(losses[:2]), losses  # forward KL (beta 0) to the teacher
    with pytest.raises(ConfigError, match="must be the teacher's"):
        train(cfg.model_copy(update={"model": str(models["other"])}))


def test_distill_train_gkd_on_policy_from_the_command_line(models, tmp_path):
    from distill.cli import main

    data = write_sft_records(tmp_path / "sft.jsonl", 4)
    out = tmp_path / "gkd-cli"
    code = main(["train", "gkd", "--model", str(models["student"]), "--teacher-model", str(models["teacher"]), "--data", str(data),
                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--lmbda", "1", "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0 and (out / "config.json").is_file()


def test_an_epochs_short_last_batch_trains(models, tmp_path):
    from trainers.kd import train

    # 5 rows in batches of 4: the second step is the epoch's last, short batch (where statistics were once cut).
    data = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 5)
    result = train(kd_settings(models["student"], data, tmp_path / "short", max_steps=3, batch_size=4))
    history = json.loads((result.output_dir / "metrics.json").read_text())["history"]
    assert max(row.get("step", 0) for row in history) == 3 and all("kd_kl" in row for row in history if "loss" in row)


def test_kd_and_gkd_stop_before_training_when_max_length_would_cut_most_records(models, tmp_path):
    from trainers.gkd import train as train_gkd
    from trainers.kd import train as train_kd
    from trainers.settings import GKDSettings

    data = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 4)
    with pytest.raises(InputError, match=r"kd.jsonl: 4 of 4 examples .* longer than max_length=12 tokens .*--max-length to \d+"):
        train_kd(kd_settings(models["student"], data, tmp_path / "kd", max_length=12))
    with pytest.raises(InputError, match=r"kd.jsonl: 4 of 4 examples .* longer than max_length=12 tokens"):
        train_gkd(GKDSettings(model=str(models["student"]), teacher_model=str(models["teacher"]), data=data, output_dir=tmp_path / "gkd",
                              max_steps=1, max_length=12))  # fmt: skip
    assert not (tmp_path / "kd").exists() and not (tmp_path / "gkd").exists()
