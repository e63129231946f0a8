"""The chunked KD loss reproduces each architecture's own output layer (scaling, soft-capping), or falls back to full logits."""

from __future__ import annotations

import logging

import pytest
import torch

from trainers.kd_loss import sparse_divergence


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread while this module runs (tiny models; threads only spin against each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


VOCAB = 128
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: Family -> (config class, extra config values). Head parameters are set far from 1 so a head that ignored them fails.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "ministral": ("MinistralConfig", {"head_dim": 8}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "phi": ("PhiConfig", {}),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "vaultgemma": ("VaultGemmaConfig", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "granite": ("GraniteConfig", {"logits_scaling": 8.0}),
    "hyperclovax": ("HyperCLOVAXConfig", {"logits_scaling": 0.25}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "cohere2": ("Cohere2Config", {"logit_scale": 0.25}),
    "falcon_h1": ("FalconH1Config", {"lm_head_multiplier": 0.25, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                                     "mamba_d_state": 8, "mamba_chunk_size": 8}),
    "olmo": ("OlmoConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", {}),
    "stablelm": ("StableLmConfig", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "gpt2": ("GPT2Config", {}),
    "gpt_bigcode": ("GPTBigCodeConfig", {}),
    "falcon": ("FalconConfig", {}),
    "bloom": ("BloomConfig", {}),
    "smollm3": ("SmolLM3Config", {}),
    "glm": ("GlmConfig", {}),
    "glm4": ("Glm4Config", {}),
    "exaone4": ("Exaone4Config", {}),
    "helium": ("HeliumConfig", {"head_dim": 8}),
    "nemotron": ("NemotronConfig", {}),
    "apertus": ("ApertusConfig", {}),
    "arcee": ("ArceeConfig", {}),
    "seed_oss": ("SeedOssConfig", {}),
    "ernie4_5": ("Ernie4_5Config", {}),
}


def tiny(family: str, seed: int = 0):
    """A 2-layer, hidden-32, vocabulary-128 random model of `family`, float32, with logits of several units."""
    import transformers
    from transformers import AutoModelForCausalLM

    name, extra = FAMILIES[family]
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)  # fmt: skip
    config_class = getattr(transformers, name)
    known = set(config_class().to_dict())  # only the keys this family has (GPT-2's n_embd, Llama's hidden_size, ...)
    values = {k: v for k, v in {**sizes, **SPECIAL_IDS}.items() if k in known or k in ("vocab_size", *SPECIAL_IDS)}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**values, **extra), dtype=torch.float32)
    with torch.no_grad():  # larger logits, so soft-capping and scaling change them a lot
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


def batch(seed: int = 0, k: int = 6):
    """Two rows of 9 tokens (the second left-padded by 2), labels on the last 5, and a teacher's top-k at each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    teacher = torch.log_softmax(torch.randn(2, 9, VOCAB, generator=g) * 3, -1)
    top = teacher.topk(k, -1)
    return ids, mask, labels, top.indices, top.values


def reference_sums(model, ids, mask, labels, top_ids, top_lps, kind, temperature, beta):
    """CE and D summed over the labelled positions, from the model's own full logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target, keep = labels[:, 1:], labels[:, 1:] != -100
    logp = torch.log_softmax(logits, -1)
    ce = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].sum()
    mse = kind == "logit_mse"
    d, _ = sparse_divergence(logits if mse else logp, top_ids[:, 1:], top_lps[:, 1:], kind, temperature, beta, normalized=not mse)
    correct = (logits.argmax(-1) == target)[keep].sum().float()
    return ce, d[keep].sum(), correct


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_chunked_path_reproduces_the_models_own_logits_and_loss(family):
    from trainers.kd_chunked import Head, find_head, patch_kd_forward

    model = tiny(family)
    head = find_head(model)
    assert isinstance(head, Head), head
    ids, mask, labels, top_ids, top_lps = batch()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits.float()
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert theirs.abs().max() > 1.5  # logits large enough that a missed scale or cap would show
    ours = head.logits(hidden)
    torch.testing.assert_close(torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    for kind, temperature in [("forward", 1.0), ("jsd", 2.0), ("logit_mse", 1.0)]:
        expected = reference_sums(model, ids, mask, labels, top_ids, top_lps, kind, temperature, 0.3)
        fresh = tiny(family)
        assert patch_kd_forward(fresh, kind, temperature, 0.3, chunk_size=3)
        with torch.no_grad():
            sums = fresh(input_ids=ids, attention_mask=mask, labels=labels, kd_ids=top_ids, kd_logprobs=top_lps)
        got = (sums["ce_sum"], sums["d_sum"], sums["correct"])
        for name, a, b in zip(("ce", "d", "correct"), got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{family} {kind}: {name}")
        assert sums["labelled"].item() == (labels[:, 1:] != -100).sum().item()


def test_a_head_the_chunked_path_does_not_know_falls_back_to_full_logits(caplog):
    from transformers import LlamaForCausalLM

    from trainers import kd_chunked

    class ScaledLlama(LlamaForCausalLM):  # a model whose forward rescales its logits (as remote code may)
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = ScaledLlama(tiny("llama").config)
    with caplog.at_level(logging.WARNING, logger="trainers.kd_chunked"):
        assert not kd_chunked.patch_kd_forward(model, "forward", 1.0, 0.5, 4)
    assert "full logits instead of the chunked loss" in caplog.text and "ScaledLlama" in caplog.text
    assert model.forward.__func__ is ScaledLlama.forward  # not patched


def test_a_known_class_whose_forward_no_longer_matches_its_entry_falls_back(monkeypatch, caplog):
    from trainers import kd_chunked

    # As if a transformers release had changed Granite's head: the entry says plain, the forward divides.
    monkeypatch.setitem(kd_chunked.HEADS, "GraniteForCausalLM", kd_chunked.HEADS["LlamaForCausalLM"])
    model = tiny("granite")
    with caplog.at_level(logging.WARNING, logger="trainers.kd_chunked"):
        assert not kd_chunked.patch_kd_forward(model, "forward", 1.0, 0.5, 4)
    assert "differ from the head's" in caplog.text


def test_a_mixture_of_experts_model_keeps_full_logits():
    from transformers import MixtralConfig, MixtralForCausalLM

    from trainers.kd_chunked import find_head

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=2)  # fmt: skip
    assert "mixture of experts" in find_head(MixtralForCausalLM(config))


def test_kd_trains_a_granite_student_with_the_chunked_loss_equal_to_the_full_one(tmp_path):
    """End to end through KDTrainer: Granite's logits_scaling is in the chunked loss exactly as in the full-logits one."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from tests.test_train_kd import kd_settings, write_kd_records
    from tests.tiny_models import make_tiny_llama, make_tokenizer
    from trainers.kd import build_trainer

    teacher = make_tiny_llama(tmp_path / "teacher")
    student = tmp_path / "granite"
    tok = make_tokenizer(student)
    torch.manual_seed(1)
    config = GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, logits_scaling=0.125, tie_word_embeddings=True,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    GraniteForCausalLM(config).save_pretrained(str(student))
    data = write_kd_records(tmp_path / "kd.jsonl", teacher, 4)
    losses = []
    for chunk in (0, 3):
        trainer, _, _ = build_trainer(kd_settings(student, data, tmp_path / f"o{chunk}", chunk_size=chunk, alpha=0.3))
        assert trainer.kd_chunked == (chunk > 0)
        inputs = trainer.data_collator([dict(r) for r in trainer.train_dataset])
        trainer.model.train()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, inputs).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_every_class_the_chunked_path_knows_is_built_and_checked_above():
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from trainers.kd_chunked import HEADS

    built = {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[getattr(transformers, name).model_type] for name, _ in FAMILIES.values()}
    assert built == set(HEADS)
