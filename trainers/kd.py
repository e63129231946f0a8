"""KD: SFT plus a sparse divergence to the teacher's top-k logprobs stored with each example.

loss = alpha * CE(the teacher's tokens) + (1 - alpha) * T^2 * D(teacher || student), with D
over the teacher's top-k support plus one tail bucket (trainers/kd_loss.py defines it
exactly). The soft labels ride inside each row through TRL's data pipeline
(trainers/kd_data.py), so they stay aligned under shuffling, gradient accumulation and
several GPUs. The student must share the teacher's tokenizer; it is checked by vocabulary
hash (soft labels that name no tokenizer need --teacher-tokenizer or --token-strings-only),
and every row by comparing the student's tokenization with the teacher's tokens. A student
whose chat template renders the prompts unlike the teacher's gets a warning.
The loss is computed from hidden states in chunks of labelled tokens (trainers/kd_chunked.py),
so no (batch, length, vocabulary) logits exist, for the architectures whose output layer it
knows (others, and chunk_size 0, use full logits).
"""

from __future__ import annotations

import functools
import logging

import torch
from trl import SFTTrainer

from synth.errors import ConfigError
from trainers import sft
from trainers.common import load_tokenizer, resolve_model, train_and_save
from trainers.kd_chunked import SUMS, patch_kd_forward
from trainers.kd_data import (
    KD_COLUMNS,
    KDCollator,
    as_prompt_completion,
    attach_soft_labels,
    check_tokenizer,
    prompt_rendering_warning,
    read_soft_labels,
)
from trainers.kd_loss import sparse_divergence
from trainers.settings import KDSettings, TrainResult, require_data

log = logging.getLogger(__name__)


class KDTrainer(SFTTrainer):
    """SFTTrainer whose loss adds (1 - alpha) * T^2 * D to alpha * CE."""

    def __init__(self, *args, kd: KDSettings, soft, **kwargs):
        self.kd, self.soft, self.kd_counts = kd, soft, {}
        for key in ("train_dataset", "eval_dataset"):
            kwargs[key] = as_prompt_completion(kwargs.get(key))
        super().__init__(*args, **kwargs)
        self.data_collator = KDCollator(self.data_collator)
        self.kd_chunked = kd.chunk_size > 0 and patch_kd_forward(self.model, kd.divergence, kd.temperature, kd.beta, kd.chunk_size)
        vocab = getattr(self.model.config, "vocab_size", None)
        if vocab is not None and vocab < len(self._tokenizer):
            raise ConfigError(f"the student's output layer has {vocab} tokens, fewer than its tokenizer's {len(self._tokenizer)}")

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        dataset, counts = attach_soft_labels(dataset, self.soft, self._tokenizer, dataset_name)
        for reason, n in counts.items():
            self.kd_counts[f"{dataset_name}:{reason}"] = self.kd_counts.get(f"{dataset_name}:{reason}", 0) + n
        skipped = sum(n for reason, n in counts.items() if reason != "ok")
        if skipped:
            log.warning("KD %s: %d of %d rows skipped (%s)", dataset_name, skipped, sum(counts.values()),
                        ", ".join(f"{r}: {n}" for r, n in counts.items() if r != "ok"))  # fmt: skip
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *KD_COLUMNS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        top_ids, top_logprobs = inputs.pop("kd_ids"), inputs.pop("kd_logprobs")
        if not self.kd_chunked:
            return self._loss_from_logits(model, inputs, top_ids, top_logprobs, return_outputs, num_items_in_batch)
        inputs.pop("_prediction_loss_only", None)
        sums = model(**inputs, kd_ids=top_ids, kd_logprobs=top_logprobs)
        loss = self._combine(sums["ce_sum"], sums["d_sum"], self._denominator(inputs["labels"], num_items_in_batch))
        mode = "train" if self.model.training else "eval"
        # gather, not gather_for_metrics: on an epoch's short last batch the latter cuts dim 0 to the rows
        # left, and dim 0 here is the statistics, not the batch.
        gathered = self.accelerator.gather(torch.stack([sums[k].detach() for k in SUMS]))
        stats = dict(zip(SUMS, gathered.reshape(-1, len(SUMS)).sum(0)))
        labelled, positions = stats["labelled"].clamp_min(1), stats["kd_positions"].clamp_min(1)
        self._metrics[mode]["entropy"].append((stats["entropy_sum"] / labelled).item())
        self._metrics[mode]["mean_token_accuracy"].append((stats["correct"] / labelled).item())
        self._metrics[mode]["kd_divergence"].append((stats["d_sum"] / positions).item())
        self._metrics[mode]["kd_kl"].append((stats["kl_sum"] / positions).item())
        if mode == "train":  # the token count TRL's SFTTrainer logs
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, sums) if return_outputs else loss

    def _loss_from_logits(self, model, inputs, top_ids, top_logprobs, return_outputs, num_items_in_batch):
        """The plain path (chunk_size 0, or a model the chunked path does not support): full logits."""
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # Logits at position t predict the token at t + 1, whose candidates the collator put at t + 1.
        logits, top_ids, top_logprobs = outputs.logits[:, :-1], top_ids[:, 1:], top_logprobs[:, 1:]
        cfg = self.kd
        d, has = sparse_divergence(logits, top_ids, top_logprobs, cfg.divergence, cfg.temperature, cfg.beta)
        loss = self._combine(ce, d.sum(), self._denominator(inputs["labels"], num_items_in_batch), ce_is_mean=True)
        mode = "train" if self.model.training else "eval"
        n = has.sum().clamp_min(1)
        with torch.no_grad():
            self._metrics[mode]["kd_divergence"].append((d.detach().sum() / n).item())
            if (cfg.divergence, cfg.temperature) != ("forward", 1.0):
                d, _ = sparse_divergence(logits.detach(), top_ids, top_logprobs, "forward", 1.0)
            self._metrics[mode]["kd_kl"].append((d.detach().sum() / n).item())
        return (loss, outputs) if return_outputs else loss

    def _combine(self, ce, d_sum, denominator, ce_is_mean=False):
        """alpha * CE + (1 - alpha) * T^2 * D, both per labelled token of the whole (accumulated) batch."""
        cfg = self.kd
        scale = 1.0 if cfg.divergence == "logit_mse" else cfg.temperature**2
        ce = ce if ce_is_mean else ce / denominator
        return cfg.alpha * ce + (1 - cfg.alpha) * scale * d_sum / denominator

    def _denominator(self, labels, num_items_in_batch):
        """What TRL/transformers divide a summed CE by, so D is scaled exactly like CE (accumulation, devices)."""
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            if self.args.average_tokens_across_devices:  # Trainer.compute_loss multiplies the CE by the devices
                devices = self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
                return num_items_in_batch / devices
            return num_items_in_batch
        return (labels[:, 1:] != -100).sum().clamp_min(1)

    def kd_summary(self) -> dict[str, float]:
        """Rows used and skipped per reason, as metrics."""
        out = {f"kd_rows_{key.replace(':', '_').replace(' ', '_')}": float(n) for key, n in self.kd_counts.items()}
        out["kd_unmapped_candidates"] = float(self.soft.unmapped)
        return out


def build_trainer(config: KDSettings):
    """(KDTrainer, tokenizer, note): SFT's trainer built with the KD subclass, after the tokenizer check."""
    tokenizer = load_tokenizer(resolve_model(config.model, config.trust_remote_code), config)
    data = require_data(config)
    soft = read_soft_labels(data, tokenizer, config.max_length)
    note = check_tokenizer(tokenizer, soft, data, config.teacher_tokenizer, config.token_strings_only)
    log.info("KD tokenizer check: %s", note)
    warning = prompt_rendering_warning(tokenizer, soft, config.teacher_tokenizer)
    if warning:
        log.warning(warning)
    cls = functools.partial(KDTrainer, kd=config, soft=soft)
    # TRL's default chunked_nll hides the logits the divergence reads: KD chunks its own loss (trainers/kd_chunked.py).
    trainer, tokenizer = sft.build_trainer(config, trainer_class=cls, extra_args={"loss_type": "nll"})
    return trainer, tokenizer, note


def train(config: KDSettings) -> TrainResult:
    """Distill the student from the stored soft labels; returns where the model went and its metrics."""
    trainer, tokenizer, _ = build_trainer(config)
    return train_and_save(trainer, config, tokenizer, extra_metrics=trainer.kd_summary())

