"""The KD objective from hidden states, in chunks of labelled tokens: no (batch, length, vocabulary) logits.

The same idea as TRL's `chunked_nll` SFT loss, which KD cannot use because it hides the
logits: the student's forward is patched to stop before the output layer; the labelled
positions are gathered, and each chunk of them goes through the output layer, the
cross-entropy and the sparse divergence together, under activation checkpointing. Peak
memory for the head is chunk x vocabulary instead of batch x length x vocabulary, and
prompt positions never reach the output layer. Calls without soft labels (generation,
plain evaluation) run the model's own forward.

The output layer is more than `lm_head` in some models: Granite divides the logits by
`logits_scaling`, Cohere multiplies them by `logit_scale`, Gemma 2/3 soft-cap them. HEADS
says, per transformers class, what its forward does between the final hidden state and the
logits it returns; a class not in it (remote code, multimodal, anything new) keeps the
full-logits path. Before patching, the model's own forward is run once on large random
hidden states and must return the logits this head computes, so a transformers version
whose head changed falls back too instead of training on other logits.
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from trainers.kd_loss import sparse_divergence

log = logging.getLogger(__name__)

#: Fields of the dict the patched forward returns (all sums over this process's batch).
SUMS = ("ce_sum", "d_sum", "kl_sum", "kd_positions", "correct", "entropy_sum", "labelled")


def _plain(model) -> tuple[float, float | None]:
    return 1.0, None


def _softcap(model) -> tuple[float, float | None]:  # logits = cap * tanh(logits / cap), when the config sets a cap
    return 1.0, model.config.final_logit_softcapping


#: Class name -> (multiplier, soft cap) that class's forward applies to lm_head(hidden), in that order.
#: Only classes whose forward was read (transformers 5.24) and whose tiny build is tested (tests/test_train_kd_heads.py).
HEADS: dict[str, Callable] = {
    **dict.fromkeys([
        "LlamaForCausalLM", "MistralForCausalLM", "MinistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
        "PhiForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM",
        "StableLmForCausalLM", "Starcoder2ForCausalLM", "GPTNeoXForCausalLM", "GPT2LMHeadModel", "GPTBigCodeForCausalLM",
        "FalconForCausalLM", "BloomForCausalLM", "SmolLM3ForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM", "Exaone4ForCausalLM",
        "HeliumForCausalLM", "NemotronForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM", "SeedOssForCausalLM",
        "Ernie4_5ForCausalLM",
    ], _plain),  # fmt: skip
    **dict.fromkeys(["Gemma2ForCausalLM", "Gemma3ForCausalLM", "VaultGemmaForCausalLM"], _softcap),
    "GraniteForCausalLM": lambda m: (1.0 / m.config.logits_scaling, None),
    "HyperCLOVAXForCausalLM": lambda m: (float(m.config.logits_scaling), None),
    "CohereForCausalLM": lambda m: (float(getattr(m, "logit_scale", m.config.logit_scale)), None),
    "Cohere2ForCausalLM": lambda m: (float(getattr(m, "logit_scale", m.config.logit_scale)), None),
    "FalconH1ForCausalLM": lambda m: (float(m.model.lm_head_multiplier), None),
}


@dataclass(frozen=True)
class Head:
    """What turns a final hidden state into the model's logits: (h @ weight.T + bias) * scale, then the soft cap."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of `hidden` (..., hidden size)."""
        return head_logits(hidden, self.weight, self.bias, self.scale, self.softcap)


def head_logits(h, weight, bias, scale=1.0, softcap=None) -> torch.Tensor:
    """The output layer in float32: the matmul, the bias, the multiplier, the soft cap."""
    logits = h.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def find_head(model) -> Head | str:
    """The model's output layer as a Head, or why the chunked path cannot reproduce it (a sentence)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(target)
    text = target.config.get_text_config()
    if getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None):
        return f"{cls.__name__} is a mixture of experts (its router loss lives in the full forward)"
    head = target.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"{cls.__name__}'s output layer is a {type(head).__name__}, not a plain Linear (e.g. LoRA on lm_head)"
    if cls.__name__ not in HEADS or not cls.__module__.startswith("transformers."):
        return f"{cls.__name__} ({cls.__module__}) is not a class whose output layer the chunked loss knows"
    scale, softcap = HEADS[cls.__name__](target)
    return Head(head.weight, head.bias, float(scale), None if softcap is None else float(softcap))


def check_head(model, head: Head, positions: int = 4) -> str | None:
    """None if the model's own forward maps a final hidden state to `head`'s logits; else what differed.

    Runs the forward once on `positions` tokens, with the base model's output replaced by
    random hidden states scaled to logits of tens, where any multiplier or soft cap shows.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen = torch.Generator().manual_seed(0)
    size = head.weight.shape[1]
    norm = head.weight.detach().float().norm(dim=1).mean().clamp_min(1e-6).item()
    probe = torch.randn(1, positions, size, generator=gen) * (30.0 / norm)
    state = {}

    def swap(module, args, output):
        first = output[0] if isinstance(output, tuple) else output.last_hidden_state
        state["hidden"] = probe.to(first.device, first.dtype)
        if isinstance(output, tuple):
            return (state["hidden"], *output[1:])
        output.last_hidden_state = state["hidden"]
        return output

    ids = torch.zeros(1, positions, dtype=torch.long, device=head.weight.device)
    handle = target.base_model.register_forward_hook(swap)
    training = target.training
    try:
        target.eval()
        with torch.no_grad():
            theirs = target(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float().cpu()
            ours = head.logits(state["hidden"].to(head.weight.device)).cpu()
    except Exception as exc:  # noqa: BLE001 - e.g. sharded weights: the full-logits path still works
        return f"checking it failed ({type(exc).__name__}: {exc})"
    finally:
        handle.remove()
        target.train(training)
    if theirs.shape != ours.shape:
        return f"its forward returns logits of shape {tuple(theirs.shape)}, the head {tuple(ours.shape)}"
    error = (theirs - ours).abs().max().item()
    if error > 0.02 * max(1.0, theirs.abs().max().item()):
        return f"its forward's logits differ from the head's by up to {error:.3g} (largest logit {theirs.abs().max().item():.3g})"
    return None


def patch_kd_forward(model, kind: str, temperature: float, beta: float, chunk_size: int) -> bool:
    """Make `model(..., kd_ids=, kd_logprobs=)` return the KD sums; False (nothing patched, a warning logged) where unsupported.

    Unsupported: a class not in HEADS, a head the model's forward does not reproduce (check_head),
    an output layer that is not a plain Linear (e.g. LoRA on lm_head) and mixture-of-experts
    models (their router loss lives in the full forward).
    """
    head = find_head(model)
    why = head if isinstance(head, str) else check_head(model, head)
    if why is not None:
        log.warning("KD: full logits instead of the chunked loss (more memory): %s", why)
        return False
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = target.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, kd_ids=None, kd_logprobs=None, **kwargs):
        if kd_ids is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        kwargs.pop("use_cache", None)
        kwargs.pop("num_items_in_batch", None)
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        # Hidden state t predicts token t + 1: shift labels and soft labels left by one.
        return chunked_kd_sums(
            hidden[:, :-1], head.weight, head.bias, labels[:, 1:], kd_ids[:, 1:], kd_logprobs[:, 1:],
            kind, temperature, beta, chunk_size, head.scale, head.softcap,
        )  # fmt: skip

    # generate() validates kwargs against the signature: keep the model's own.
    forward.__signature__ = inspect.signature(original.__func__)
    target.forward = types.MethodType(forward, target)
    return True


def chunked_kd_sums(hidden, weight, bias, labels, top_ids, top_logprobs, kind="forward", temperature=1.0, beta=0.5,
                    chunk_size=256, scale=1.0, softcap=None) -> dict:  # fmt: skip
    """Sums of CE and D (with gradients) and of the logged statistics, over the labelled positions, chunk by chunk."""
    flat = labels.reshape(-1)
    index = (flat != -100).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1])[index]
    labels, ids = flat[index], top_ids.reshape(-1, top_ids.shape[-1])[index]
    lps = top_logprobs.reshape(-1, top_logprobs.shape[-1])[index]
    totals = None
    # At least one (possibly empty) chunk, so every head parameter is in the graph even with no labels here.
    for start in range(0, max(len(index), 1), chunk_size):
        end = start + chunk_size
        part = checkpoint(
            _chunk, h[start:end], weight, bias, labels[start:end], ids[start:end], lps[start:end],
            kind, temperature, beta, scale, softcap, use_reentrant=False,
        )  # fmt: skip
        totals = part if totals is None else tuple(a + b for a, b in zip(totals, part))
    return dict(zip(SUMS, totals))


def _chunk(h, weight, bias, labels, ids, lps, kind, temperature, beta, scale, softcap):
    """One chunk: logits, CE sum, D sum (differentiable), then KL at T=1, count, correct, entropy (not)."""
    logits = head_logits(h, weight, bias, scale, softcap)
    logp = torch.log_softmax(logits, -1)
    ce = torch.nn.functional.nll_loss(logp, labels, reduction="sum")
    mse = kind == "logit_mse"
    d, has = sparse_divergence(logits if mse else logp, ids, lps, kind, temperature, beta, normalized=not mse)
    with torch.no_grad():
        if (kind, temperature) == ("forward", 1.0):
            kl = d.detach()
        else:
            kl, _ = sparse_divergence(logp, ids, lps, "forward", 1.0, normalized=True)
        correct = (logits.argmax(-1) == labels).sum().float()
        entropy = -(logp.exp() * logp).sum()
    count = torch.tensor(float(len(labels)), device=logits.device)
    return ce, d.sum(), kl.sum(), has.sum().float(), correct, entropy, count
