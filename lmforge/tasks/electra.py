"""ELECTRA pretraining as a task: MLM batches (the masking of tasks/mlm.py), a loss that adds the
generator's MLM loss and the discriminator's replaced-token detection, and their metrics.

The loop sees what it sees for any task: `loss_sum` divided by the step's targets (the masked
positions) gives the generator's mean MLM loss, and a loss term over "real_tokens" (Batch.counts)
adds rtd_weight x the discriminator's binary cross-entropy, divided by the step's real tokens:
its mean over every real token of the global batch. `mlm_loss`, `rtd_loss` and `rtd_accuracy` are
logged beside it. Validation reports `loss` as the generator's MLM loss (comparable with the
unigram baseline and with a BERT run's), and the discriminator's accuracy on replaced and on
original tokens separately (most tokens are originals: overall accuracy alone flatters it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.models.bert import BertForMaskedLM
from lmforge.models.electra import Electra, ElectraOutput
from lmforge.rng import derive_seed
from lmforge.runs.readers import LoadedModel
from lmforge.tasks.base import Batch, EvalResult, LossOutput, Table
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.tasks.registry import register


def electra_loss(model: nn.Module, tensors: dict[str, torch.Tensor], rtd_weight: float) -> LossOutput:
    """Summed generator MLM loss, with rtd_weight x the discriminator's summed loss as a term over
    "real_tokens" (see the module docstring), the generator's correct count and both parts for
    logging."""
    selected = tensors["selected"]
    out = model(tensors["masked_ids"], tensors["input_ids"], selected, tensors["sample_seeds"],
                tensors.get("attention_mask"))
    mlm_sum, correct = out.mlm_loss_sum, out.correct
    real = (tensors["attention_mask"].bool() if "attention_mask" in tensors
            else torch.ones_like(selected))
    disc = out.discriminator_logits.float()[real]
    replaced = out.replaced[real]
    rtd_sum = F.binary_cross_entropy_with_logits(disc, replaced, reduction="sum")
    rtd_correct = ((disc > 0).float() == replaced).sum()
    return LossOutput(mlm_sum, {"accuracy": correct, "mlm_loss": mlm_sum.detach(), "rtd_loss": rtd_sum.detach(),
                                "rtd_accuracy": rtd_correct},
                      terms={"real_tokens": rtd_weight * rtd_sum},
                      per={"rtd_loss": "real_tokens", "rtd_accuracy": "real_tokens"})


@register
class ElectraTask(MaskedLMTask):
    name = "electra"
    archs = ("bert",)  # the generator and discriminator are BERT encoders (lmforge/models/electra.py)
    continues = False  # two models of their own shapes: model.init_from is refused

    @classmethod
    def build_model(cls, cfg: Config) -> nn.Module:
        return Electra(cfg.model, cfg.electra.generator_frac, cfg.electra.share_embeddings)

    @classmethod
    def load_run(cls, run_dir: Path, cfg: Config, *, mlm_head_required: bool = True) -> LoadedModel:
        """The discriminator, as a BERT encoder with a fresh (untrained) masked-LM head, for
        fine-tuning; the whole generator + discriminator pair is `LoadedModel.electra` (export)."""
        whole = super().load_run(run_dir, cfg, mlm_head_required=mlm_head_required)
        encoder = BertForMaskedLM(cfg.model)
        encoder.load_state_dict({k: v for k, v in whole.model.state_dict().items() if k.startswith("bert.")},
                                strict=False)
        note = (f"{run_dir} is an ELECTRA run: its discriminator has no masked-LM head (a fresh one was "
                f"initialised); fine-tune it, or export it (ElectraForPreTraining)")
        if mlm_head_required:
            print(f"warning: {note}", file=sys.stderr)
        return LoadedModel(encoder.eval(), cfg.model, whole.tokenizer, "lmforge", [note], electra=whole.model,
                           fresh_mlm_head=True)

    def train_batch(self, step: int, micro: int) -> Batch:
        batch = super().train_batch(step, micro)
        rows = self.step_rows(micro, self.step_shape(step).rows)
        # the generator's draw for each row of the step's global batch: the same at any split and on resume
        batch.tensors["sample_seeds"] = torch.tensor(
            [derive_seed(self.cfg.train.seed, "electra-sample", step, g) for g in rows])
        mask = batch.tensors.get("attention_mask")
        batch.counts["real_tokens"] = int(mask.sum()) if mask is not None else batch.tensors["input_ids"].numel()
        return batch

    def eval_batches(self) -> list[Batch]:
        batches = super().eval_batches()
        for i, batch in enumerate(batches):
            if "sample_seeds" not in batch.tensors:
                rows = batch.tensors["input_ids"].size(0)
                batch.tensors["sample_seeds"] = torch.tensor(
                    [derive_seed(self.cfg.train.seed, "electra-eval", i, row) for row in range(rows)])
        return batches

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        return electra_loss(model, batch.tensors, self.cfg.electra.rtd_weight)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(("loss", "correct", "unigram", "rtd_loss", "replaced_right", "original_right"), 0.0)
        targets_n = tokens = replaced_n = 0
        first = None
        logp = self.unigram_logp.to(device)
        for batch in self.eval_batches():
            t = {k: v.to(device) for k, v in batch.tensors.items()}
            out = model(t["masked_ids"], t["input_ids"], t["selected"], t["sample_seeds"], t.get("attention_mask"))
            targets = t["input_ids"][t["selected"]]
            sums["loss"] += out.mlm_loss_sum.item()
            sums["correct"] += out.correct.item()
            sums["unigram"] += -logp[targets].sum().item()
            disc, replaced = out.discriminator_logits.float(), out.replaced
            sums["rtd_loss"] += F.binary_cross_entropy_with_logits(disc, replaced, reduction="sum").item()
            flagged = disc > 0
            sums["replaced_right"] += (flagged & (replaced > 0)).sum().item()
            sums["original_right"] += (~flagged & (replaced == 0)).sum().item()
            targets_n += len(targets)
            tokens += replaced.numel()
            replaced_n += int(replaced.sum())
            if first is None:
                first = (t, out)
        model.train(was_training)
        originals = max(1, tokens - replaced_n)
        metrics = {"loss": sums["loss"] / targets_n, "accuracy": sums["correct"] / targets_n,
                   "unigram_loss": sums["unigram"] / targets_n, "rtd_loss": sums["rtd_loss"] / tokens,
                   "rtd_accuracy": (sums["replaced_right"] + sums["original_right"]) / tokens,
                   "rtd_replaced_recall": sums["replaced_right"] / max(1, replaced_n),
                   "rtd_original_accuracy": sums["original_right"] / originals,
                   "replaced_share": replaced_n / tokens, "masked_tokens": targets_n}
        table = self.electra_table(*first)
        return EvalResult(metrics, table.markdown(), table)

    def decode_batch(self, model: nn.Module, batch: Batch) -> Table:
        """A training batch as the overfit test shows it: the discriminator's input (replaced
        tokens in bold), the originals there, and what it flagged as replaced."""
        t = batch.tensors
        out = model(t["masked_ids"], t["input_ids"], t["selected"], t["sample_seeds"], t.get("attention_mask"))
        return self.electra_table(t, out)

    def electra_table(self, t: dict, out: ElectraOutput, rows: int = 4, max_tokens: int = 40) -> Table:
        """Per example: what the discriminator saw (replaced tokens in bold) and the tokens it
        flagged as replaced."""
        tok = self.tokenizer
        corrupted = t["input_ids"].masked_scatter(t["selected"], out.sampled)
        table = Table(["discriminator input (replaced in bold)", "original at replaced", "flagged as replaced"], [])
        for r in range(min(rows, corrupted.size(0))):
            replaced = out.replaced[r, :max_tokens] > 0
            flagged = out.discriminator_logits[r, :max_tokens] > 0
            ids = corrupted[r, :max_tokens].tolist()
            words = [f"**{tok.id_to_token(i)}**" if replaced[j] else tok.id_to_token(i) for j, i in enumerate(ids)]
            originals = [tok.id_to_token(i) for i in t["input_ids"][r, :max_tokens][replaced].tolist()]
            table.rows.append([" ".join(words), " ".join(originals),
                               " ".join(tok.id_to_token(ids[j]) for j in range(len(ids)) if flagged[j])])
        return table

    def summary(self, last_eval: dict[str, float]) -> dict[str, float]:
        return {"val_loss": last_eval["loss"], "unigram_val_loss": last_eval["unigram_loss"],
                "val_accuracy": last_eval["accuracy"], "val_rtd_accuracy": last_eval["rtd_accuracy"],
                "val_rtd_replaced_recall": last_eval["rtd_replaced_recall"]}
