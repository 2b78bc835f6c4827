"""BERT masked-LM training speed: lmforge against transformers, side by side in one process.

Variants, all on the same config, the same batches (same token ids, same masks), the same
fused AdamW (two parameter groups, lr 1e-4) and the same precision:
  lmforge       lmforge's BertForMaskedLM through the MLM task's loss (tasks/mlm.py): the
                vocabulary head runs on the selected positions only, fused with the loss
  hf            transformers' BertForMaskedLM, default (sdpa) attention, as run_mlm.py runs it:
                logits for every position, labels -100 elsewhere
  hf-selected   the same transformers model given the selected-positions trick by hand
Each precision (fp32; bf16 = CPU bf16 autocast, what lmforge's precision=auto picks on a CPU
with native bf16 and transformers' --bf16 flag does) is a separate table with freshly built
models. Steps are timed in interleaved rounds (one step of each variant per round), median
reported. Columns: tokens/s; "lmforge x" = lmforge's tokens/s over this variant's; MFU = matmul
FLOPs per step (counted by FlopCounterMode on one real step, see common.count_flops) / step time
/ the matmul peak measured in this run in the same dtype; peak RSS = resident memory the model,
its optimizer state and its first two steps added.

    python benchmarks/bench_bert_mlm.py                 # L4 H256 A4 FFN1024, vocab 30,522, seq 128, batch 32
    python benchmarks/bench_bert_mlm.py --precision fp32 --rounds 20
    python benchmarks/bench_bert_mlm.py --smoke --json  # seconds; what CI runs to keep this working
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import common
from lmforge.config import ModelConfig
from lmforge.data.mlm import random_mask
from lmforge.models.bert import BertForMaskedLM
from lmforge.tasks.mlm import mlm_loss

VARIANTS = ("lmforge", "hf", "hf-selected")
# --smoke's sizes (with 2 rounds), and those of the uncounted warm-up steps
SMOKE = {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64, "vocab": 2000, "seq": 16, "batch": 4}


def make_batches(args, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    special = torch.zeros(args.vocab, dtype=torch.bool)
    special[:1000] = True  # ids below 1000 play [PAD]/[CLS]/[SEP]/[MASK]/unused
    out = []
    for _ in range(n):
        ids = torch.randint(1000, args.vocab, (args.batch, args.seq), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        masked, selected = random_mask(ids, mask_id=103, special_mask=special, generator=g)
        out.append({"masked_ids": masked, "input_ids": ids, "selected": selected,
                    "labels": torch.where(selected, ids, torch.full_like(ids, -100))})
    return out


def build(name: str, args) -> torch.nn.Module:
    if name == "lmforge":
        return BertForMaskedLM(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                                           num_heads=args.heads, intermediate_size=args.ffn,
                                           max_position_embeddings=max(512, args.seq), dropout=args.dropout))
    import transformers

    cfg = transformers.BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, intermediate_size=args.ffn,
                                  max_position_embeddings=max(512, args.seq), hidden_dropout_prob=args.dropout,
                                  attention_probs_dropout_prob=args.dropout)
    return transformers.BertForMaskedLM(cfg)


def loss_of(name: str, model, b: dict) -> torch.Tensor:
    if name == "lmforge":  # exactly what the MLM task's loss is; the loop divides by the target count
        return mlm_loss(model, b).loss_sum / b["selected"].sum()
    if name == "hf":
        return model(input_ids=b["masked_ids"], labels=b["labels"]).loss
    hidden = model.bert(input_ids=b["masked_ids"]).last_hidden_state
    return F.cross_entropy(model.cls(hidden[b["selected"]]), b["input_ids"][b["selected"]])


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    common.add_training_options(p, VARIANTS, rounds=12,
                                layers=4, hidden=256, heads=4, ffn=1024, vocab=30522, seq=128, batch=32)
    args, tiny = common.parse_training_args(p, argv, VARIANTS, smoke=SMOKE, warm_up=SMOKE)
    title = (f"BERT-MLM training: L{args.layers} H{args.hidden} A{args.heads} FFN{args.ffn}, vocab {args.vocab:,}, "
             f"seq {args.seq}, batch {args.batch}")
    return common.run_training_benchmark(args, "bert-mlm-train", title, tiny, make_batches, build, loss_of)


if __name__ == "__main__":
    raise SystemExit(main())
