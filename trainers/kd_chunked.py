"""The KD objective from hidden states, in chunks of labelled tokens: no (batch, length, vocabulary) logits.

The same idea as TRL's `chunked_nll` SFT loss, which KD cannot use because it hides the
logits: the student's forward is patched to stop before the output layer; the labelled
positions are gathered, and each chunk of them goes through the output layer, the
cross-entropy and the sparse divergence together, under activation checkpointing. Peak
memory for the head is chunk x vocabulary instead of batch x length x vocabulary, and
prompt positions never reach the output layer. Calls without soft labels (generation,
plain evaluation) run the model's own forward.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch.utils.checkpoint import checkpoint

from trainers.kd_loss import sparse_divergence

#: Fields of the dict the patched forward returns (all sums over this process's batch).
SUMS = ("ce_sum", "d_sum", "kl_sum", "kd_positions", "correct", "entropy_sum", "labelled")


def patch_kd_forward(model, kind: str, temperature: float, beta: float, chunk_size: int) -> bool:
    """Make `model(..., kd_ids=, kd_logprobs=)` return the KD sums; False (nothing patched) where unsupported.

    Unsupported: an output layer that is not a plain Linear (e.g. LoRA on lm_head) and
    mixture-of-experts models (their router loss lives in the full forward).
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = target.get_output_embeddings()
    text = target.config.get_text_config()
    if type(head) is not torch.nn.Linear or getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None):
        return False
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    scale = 1.0 if scale is None else scale
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
            kind, temperature, beta, chunk_size, scale, softcap,
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
    logits = h.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
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
