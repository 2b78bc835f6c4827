"""How big each optimizer step is: its sequence length, rows per micro-batch and number of
micro-batches. Two pretraining recipes change a step's shape as training goes; both live here so
that the loop and the tasks read one answer, `BatchSchedule.at(step)`.

Sequence-length schedule (BERT, Devlin et al. 2019, appendix A.2; seed MLAB W2D2 bonus): the
first `data.short_seq_frac` of the steps (default 90%) use data.seq_len (128), the rest
data.long_seq_len (512). Attention costs grow with the square of the length, so most steps are
short; the last ones teach the position embeddings beyond 128 (the table is sized for the
longest: model.max_position_embeddings >= data.long_seq_len). Rows per micro-batch shrink by the
same factor (32 x 128 -> 8 x 512), so tokens per step stay the same.

Batch-size ramp (GPT-3, Brown et al. 2020, appendix B): tokens per step grow linearly from
train.batch_ramp_start_tokens to the full step (train.batch_size x grad_accum_steps x seq_len x
processes) over the first train.batch_ramp_tokens tokens. As Megatron-LM's --rampup-batch-size
does, it grows in whole micro-batches: the micro-batch keeps its shape (no new kernels, no
recompilation) and the number of micro-batches accumulated per step rises from 1 to
grad_accum_steps. The loss of a step stays the mean over all its targets (the loop divides by the
step's total), and the learning-rate schedule runs in tokens rather than steps, as GPT-3's does:
a small early step advances warmup and decay by what it trains on, not by a full step.

Everything here is a pure function of the step and the config, so a resumed run needs no extra
state to continue on the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.config import Config
from lmforge.errors import LmforgeError


def check_batch_ramp(cfg: Config, world: int) -> None:
    """The batch-size ramp must start below the full step, which depends on the number of
    processes (`world`): checked when a run starts (train/machine.py check_environment) and
    before `lmforge plot-schedule` draws it (the rest of the ramp's settings are config checks)."""
    t = cfg.train
    full_step = t.batch_size * cfg.data.seq_len * t.grad_accum_steps * world  # tokens per step, all processes
    if t.batch_ramp_start_tokens is not None and t.batch_ramp_start_tokens >= full_step:
        raise LmforgeError(f"train.batch_ramp_start_tokens={t.batch_ramp_start_tokens} must be below the full step of "
                           f"{full_step} tokens (train.batch_size x data.seq_len x grad_accum_steps x {world} "
                           f"process(es))")


@dataclass(frozen=True)
class StepShape:
    seq_len: int  # tokens per sequence
    rows: int  # sequences per micro-batch, on each process
    micro_batches: int  # micro-batches accumulated into the step


class BatchSchedule:
    def __init__(self, cfg: Config, world: int = 1):
        t, d = cfg.train, cfg.data
        self.max_steps = t.max_steps
        self.short = StepShape(d.seq_len, t.batch_size, t.grad_accum_steps)
        self.long = None
        self.switch = t.max_steps  # the first step at data.long_seq_len
        if d.long_seq_len is not None:  # validate() checked that the rows divide exactly
            self.long = StepShape(d.long_seq_len, t.batch_size * d.seq_len // d.long_seq_len, t.grad_accum_steps)
            self.switch = int(round(d.short_seq_frac * t.max_steps))
        self.micro_tokens = t.batch_size * d.seq_len * world  # every micro-batch, both lengths, all processes
        self.full_tokens = self.micro_tokens * t.grad_accum_steps
        self.micro = None  # with a ramp: micro-batches of each step, and tokens before each step
        if t.batch_ramp_start_tokens is not None:
            micro = np.full(t.max_steps, t.grad_accum_steps, dtype=np.int64)
            planned, start, span = 0, t.batch_ramp_start_tokens, t.batch_ramp_tokens
            for step in range(t.max_steps):
                if planned >= span:
                    break
                wanted = start + (self.full_tokens - start) * planned / span
                micro[step] = min(t.grad_accum_steps, max(1, round(wanted / self.micro_tokens)))
                planned += int(micro[step]) * self.micro_tokens
            self.micro = micro
            self.tokens_before = np.concatenate([[0], np.cumsum(micro)]) * self.micro_tokens

    @property
    def varies(self) -> bool:
        """True when steps differ in shape (a schedule is on)."""
        return self.long is not None or self.micro is not None

    def at(self, step: int) -> StepShape:
        shape = self.long if self.long is not None and step >= self.switch else self.short
        if self.micro is not None and step < self.max_steps:
            return StepShape(shape.seq_len, shape.rows, int(self.micro[step]))
        return shape

    def progress(self, step: int) -> tuple[float, float]:
        """(position, length) of the learning-rate schedule at `step` (train/optim.py lr_at): the
        step and max_steps, or with a ramp the tokens before the step and in all, counted in full
        steps."""
        if self.micro is None:
            return step, self.max_steps
        at = self.tokens_before[min(step, self.max_steps)]
        return float(at / self.full_tokens), float(self.tokens_before[-1] / self.full_tokens)

    def step_tokens(self, step: int) -> int:
        """Tokens the step trains on (all processes, padding included)."""
        return self.micro_tokens * self.at(step).micro_batches

    def describe(self) -> str:
        """One line on what changes during training ('' when nothing does)."""
        parts = []
        if self.long is not None:
            parts.append(f"sequence length {self.short.seq_len} ({self.short.rows} rows per micro-batch) until step "
                         f"{self.switch}, then {self.long.seq_len} ({self.long.rows} rows)")
        if self.micro is not None:
            full = next((s for s in range(self.max_steps) if self.micro[s] == self.short.micro_batches), self.max_steps)
            parts.append(f"batch ramp from {self.step_tokens(0):,} tokens per step to {self.full_tokens:,} at step "
                         f"{full}; the learning-rate schedule counts tokens")
        return "; ".join(parts)
