"""GPT causal-LM training speed: lmforge against transformers' GPT2LMHeadModel, in one process.

Variants, on the same config, the same token windows, the same fused AdamW (two parameter
groups, lr 1e-4) and the same precision:
  lmforge   lmforge's GPT through the CLM task's loss (tasks/clm.py): the vocabulary projection
            and cross-entropy fused and chunked (ops/linear_cross_entropy.py), no logits kept
  hf        transformers' GPT2LMHeadModel, default (sdpa) attention, as run_clm.py runs it
            (labels = input ids, shifted inside the model)
Both read the same (batch, seq) input ids; lmforge predicts the next token at all seq positions
(its targets come from the window's next token), transformers at seq - 1 (its internal shift):
tokens/s counts batch x seq for both. Each precision (fp32; bf16 = CPU bf16 autocast) is a
separate table with freshly built models; steps are timed in interleaved rounds, median
reported; MFU and peak RSS as in bench_bert_mlm.py (see common.py).

    python benchmarks/bench_gpt_clm.py                  # L4 H256 A4, vocab 50,257, seq 256, batch 16
    python benchmarks/bench_gpt_clm.py --smoke --json   # seconds; what CI runs
"""

from __future__ import annotations

import torch

import common
from lmforge.config import ModelConfig
from lmforge.models.gpt import GPT
from lmforge.tasks.clm import clm_loss

VARIANTS = ("lmforge", "hf")
SMOKE = {"layers": 1, "hidden": 32, "heads": 2, "vocab": 1000, "seq": 16, "batch": 2}  # --smoke's sizes (with 2 rounds)
WARM_UP = {**SMOKE, "vocab": 500}  # the uncounted warm-up steps' sizes


def make_batches(args, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        window = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        out.append({"input_ids": window[:, :-1], "targets": window[:, 1:]})
    return out


def build(name: str, args) -> torch.nn.Module:
    if name == "lmforge":
        return GPT(ModelConfig(arch="gpt", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=args.heads, intermediate_size=4 * args.hidden,
                               max_position_embeddings=max(1024, args.seq), dropout=args.dropout,
                               layer_norm_eps=1e-5))
    import transformers

    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=max(1024, args.seq), n_embd=args.hidden,
                                  n_layer=args.layers, n_head=args.heads, resid_pdrop=args.dropout,
                                  embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                                  bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    return transformers.GPT2LMHeadModel(cfg)


def loss_of(name: str, model, b: dict) -> torch.Tensor:
    if name == "lmforge":  # the CLM task's loss; the loop divides by the target count
        return clm_loss(model, b).loss_sum / b["targets"].numel()
    return model(input_ids=b["input_ids"], labels=b["input_ids"]).loss


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    common.add_training_options(p, VARIANTS, rounds=8, layers=4, hidden=256, heads=4, vocab=50257, seq=256, batch=16)
    args, tiny = common.parse_training_args(p, argv, VARIANTS, smoke=SMOKE, warm_up=WARM_UP)
    title = (f"GPT causal-LM training: L{args.layers} H{args.hidden} A{args.heads}, vocab {args.vocab:,}, "
             f"seq {args.seq}, batch {args.batch}")
    return common.run_training_benchmark(args, "gpt-clm-train", title, tiny, make_batches, build, loss_of)


if __name__ == "__main__":
    raise SystemExit(main())
