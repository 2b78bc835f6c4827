"""The GPU acceptance run: one command that exercises every GPU path lmforge claims, on one CUDA
GPU, in under 10 minutes, and prints a table of what passed.

Checks, each on a tiny BERT or GPT trained on a corpus generated here (with its own trained
vocabulary: the GPU machine may have no package registry, so nothing bundled is needed):
  bf16         train.precision=auto picks bf16 on an Ampere-or-later GPU; the loss falls
  tf32         the loop turns TF32 matmuls on for fp32 work
  fused-adamw  the optimizer is torch's fused AdamW
  flash-sdpa   the attention of a bf16 BERT forward runs the flash kernel (found in the profile)
  compile      train.compile=true trains; its checkpoints hold plain names (no _orig_mod.)
  fp16-resume  train.precision=fp16 with the loss scaler; stopped and resumed = uninterrupted
  ddp / fsdp / deepspeed  torchrun --nproc_per_node=1 on NCCL, stopped at step 5 and resumed to
               10 under the same strategy, its losses equal to one plain process's (deepspeed:
               skipped where it is not installed). NOTE: with one process lmforge runs its plain
               engine whatever the strategy (lmforge/distributed make_engine wraps from 2 ranks
               on), so these check the NCCL launch, the run directory and the resume under
               torchrun, not the DDP / FSDP2 / ZeRO wrappers themselves: those need 2 GPUs (the
               2-rank gloo tests run them on the CPU)
Then it times a bert-base and a gpt2-124m training step (bf16, fused AdamW), lmforge's against
transformers' BertForMaskedLM / GPT2LMHeadModel on the same shapes: tokens/s and MFU (FLOPs
counted on the step / time / the GPU's bf16 dense peak, lmforge/runplan.py GPUS, else a measured
matmul peak).

    PYTHONPATH=. python3 benchmarks/gpu_check.py            # on the GPU machine, from the repo
    PYTHONPATH=. python3 benchmarks/gpu_check.py --json
    python benchmarks/gpu_check.py --smoke --json           # the same script on the CPU (gloo, tiny shapes): CI

Exit status 0 when every check that ran passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import common
from lmforge.config import dump_yaml, load_config
from lmforge.data.corpora import open_corpus
from lmforge.data.shards import prepare
from lmforge.data.tokenizers import train_bpe, train_wordpiece
from lmforge.jobs import pretrain, resume
from lmforge.train.log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing near "
         "old river banks every summer morning").split()


def corpus(folder: Path) -> Path:
    """200 documents of word sequences with structure a tiny model learns quickly."""
    folder.mkdir(parents=True)
    for d in range(200):
        lines = [" ".join(WORDS[(d + i * 3 + j) % len(WORDS)] for j in range(10)) + "." for i in range(20)]
        (folder / f"doc{d:03d}.txt").write_text(" ".join(lines) + "\n")
    return folder


def prepared(tmp: Path, kind: str) -> Path:
    source = open_corpus(str(corpus(tmp / f"corpus-{kind}")))
    texts = (t for _, t in source.documents())
    tok = train_wordpiece(texts, 300) if kind == "bert" else train_bpe(texts, 400)
    return prepare(source, tok, tmp / f"prepared-{kind}", val_frac=0.1, progress=False)


def tiny(data: Path, out: Path, kind: str, device: str, *more: str):
    arch = ["model.arch=gpt", "task.name=clm"] if kind == "gpt" else []
    return load_config(None, [*arch, f"data.corpus={data}", "data.seq_len=64", f"out_dir={out}",
                              "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
                              "model.intermediate_size=128", "model.max_position_embeddings=128",
                              "model.vocab_size=null", "model.dropout=0", "train.batch_size=8", "train.max_steps=20",
                              "train.eval_every=10", "train.eval_batches=2", "train.checkpoint_every=10",
                              "train.log_every=5", "train.progress=false", f"train.device={device}",
                              "optim.lr=3e-3", *more])


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


class Checks:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.device = "cpu" if args.smoke else "cuda"
        self.rows: list[dict] = []
        self.data = {k: prepared(tmp, k) for k in ("bert", "gpt")}

    def run(self, name: str, fn) -> None:
        start = time.time()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                status, detail = fn()
        except Exception as e:  # a check that crashes is a failed check, with the reason
            traceback.print_exc(file=sys.stderr)
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        self.rows.append({"check": name, "status": status, "detail": detail, "seconds": round(time.time() - start, 1)})

    def out(self, name: str) -> Path:
        return self.tmp / "runs" / name

    # -- single-process paths -------------------------------------------------------------------
    def bf16(self):
        run_dir, s = pretrain(tiny(self.data["bert"], self.out("bf16"), "bert", self.device, "train.precision=auto"))
        precision = json.loads((run_dir / "checkpoints" / "step_00000020" / "state.json").read_text())["precision"]
        l = losses(run_dir)
        want = "bf16" if not self.args.smoke else precision  # a CPU's auto may be fp32
        ok = precision == want and l[-1] < l[0]
        return ("ok" if ok else "FAIL"), f"auto -> {precision}; train loss {l[0]:.3f} -> {l[-1]:.3f}"

    def tf32(self):
        if self.args.smoke:
            return "n/a", "no CUDA"
        torch.backends.cuda.matmul.allow_tf32 = False
        pretrain(tiny(self.data["bert"], self.out("tf32"), "bert", self.device, "train.precision=fp32",
                      "train.max_steps=2"))
        ok = torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        return ("ok" if ok else "FAIL"), f"allow_tf32 after a run: matmul {torch.backends.cuda.matmul.allow_tf32}"

    def fused_adamw(self):
        from lmforge.jobs import build_model
        from lmforge.train.optim import make_optimizer

        cfg = tiny(self.data["bert"], self.out("fused"), "bert", self.device)
        from lmforge.data.prepared import fill_vocab_size
        from lmforge.data.shards import PreparedData
        fill_vocab_size(cfg, PreparedData(self.data["bert"]).tokenizer)
        opt = make_optimizer(build_model(cfg).to(self.device), cfg.optim, torch.device(self.device))
        fused = all(g.get("fused") for g in opt.param_groups) or bool(opt.defaults.get("fused"))
        return ("ok" if fused else "FAIL"), f"{type(opt).__name__}, fused={fused}"

    def flash_sdpa(self):
        if self.args.smoke:
            return "n/a", "no CUDA"
        from torch.profiler import ProfilerActivity, profile

        from lmforge.config import ModelConfig
        from lmforge.models.bert import BertForMaskedLM

        model = BertForMaskedLM(ModelConfig(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4,
                                            intermediate_size=512, max_position_embeddings=512)).cuda()
        ids = torch.randint(5, 1000, (8, 256), device="cuda")
        selected = torch.rand(8, 256, device="cuda") < 0.15
        with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, selected=selected, targets=ids[selected]).loss_sum.backward()
        kernels = {e.key for e in prof.key_averages()}
        flash = sorted(k for k in kernels if "flash" in k.lower())
        return ("ok" if flash else "FAIL"), (flash[0][:80] if flash else "no flash kernel in the profile")

    def compile(self):
        if self.args.smoke:
            return "skipped", "--smoke (inductor on a CPU takes minutes; the slow tests cover it)"
        run_dir, s = pretrain(tiny(self.data["gpt"], self.out("compile"), "gpt", self.device, "train.compile=true"))
        from safetensors.torch import load_file
        names = load_file(str(run_dir / "checkpoints" / "step_00000020" / "model.safetensors")).keys()
        clean = not any(k.startswith("_orig_mod.") for k in names)
        l = losses(run_dir)
        return ("ok" if clean and l[-1] < l[0] else "FAIL"), f"plain names: {clean}; loss {l[0]:.3f} -> {l[-1]:.3f}"

    def fp16_resume(self):
        keys = ("train.precision=fp16", "optim.schedule=constant", "optim.warmup_frac=0")
        full, _ = pretrain(tiny(self.data["bert"], self.out("fp16-full"), "bert", self.device, *keys))
        half, _ = pretrain(tiny(self.data["bert"], self.out("fp16-half"), "bert", self.device, *keys,
                                "train.max_steps=10"))
        resume(half, ["train.max_steps=20"])
        a, b = losses(full), losses(half)
        state = json.loads((half / "checkpoints" / "step_00000020" / "state.json").read_text())
        close = len(a) == len(b) and all(abs(x - y) <= 1e-3 * max(1, abs(x)) for x, y in zip(a, b))
        scaler = "loss_scaler" in state or self.args.smoke
        return ("ok" if close and scaler else "FAIL"), (f"resumed losses = uninterrupted ({len(a)} records, "
                                                        f"max diff {max(abs(x - y) for x, y in zip(a, b)):.2e}); "
                                                        f"loss scale saved: {'loss_scaler' in state}")

    # -- torchrun paths ---------------------------------------------------------------------------
    def launched(self, strategy: str):
        if strategy == "deepspeed":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                return "skipped", "DeepSpeed is not installed here"
        # a constant rate: the run stopped at 5 and resumed to 10 trains as a 10-step run does
        keys = ("train.max_steps=10", "train.checkpoint_every=5", "train.eval_every=5", "optim.schedule=constant",
                "optim.warmup_frac=0")
        cfg = tiny(self.data["bert"], self.out(f"run-{strategy}"), "bert", self.device, *keys)
        path = self.tmp / f"{strategy}.yaml"
        path.write_text(dump_yaml(cfg))
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "DS_ACCELERATOR": "cpu" if self.args.smoke else "cuda"}
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "lmforge"]
        extra = ["distributed.strategy=deepspeed", "distributed.zero_stage=2"] if strategy == "deepspeed" else \
            [f"distributed.strategy={strategy}"]
        first = subprocess.run([*head, "pretrain", "--config", str(path), *extra, "train.max_steps=5"],
                               capture_output=True, text=True, env=env, timeout=600)
        if first.returncode != 0:
            return "FAIL", first.stderr.strip().splitlines()[-1][:160] if first.stderr.strip() else "exit " + str(first.returncode)
        (run_dir,) = list(self.out(f"run-{strategy}").iterdir())
        again = subprocess.run([*head, "pretrain", "--resume", str(run_dir), "train.max_steps=10"],
                               capture_output=True, text=True, env=env, timeout=600)
        if again.returncode != 0:
            return "FAIL", "resume: " + (again.stderr.strip().splitlines()[-1][:150] if again.stderr.strip() else "")
        backend = "gloo" if self.args.smoke else "nccl"
        steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
        plain, _ = pretrain(tiny(self.data["bert"], self.out(f"plain-{strategy}"), "bert", self.device, *keys))
        a, b = losses(plain), losses(run_dir)
        same = len(a) == len(b) and all(abs(x - y) <= 1e-3 * max(1, abs(x)) for x, y in zip(a, b))
        ok = bool(steps) and steps[-1] == 10 and same
        return ("ok" if ok else "FAIL"), (f"torchrun x1 ({backend}, plain engine at one process), stopped at 5, "
                                          f"resumed to {steps[-1] if steps else '?'}, losses = one process: {same}")

    # -- speed -------------------------------------------------------------------------------------
    def speed(self, kind: str):
        from lmforge.runplan import GPUS

        if self.args.smoke:
            shape = dict(layers=1, hidden=32, heads=2, ffn=64, vocab=2000, seq=32, batch=4)
        elif kind == "bert":
            shape = dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, seq=128, batch=64)
        else:
            shape = dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=50257, seq=1024, batch=8)
        name = torch.cuda.get_device_name() if not self.args.smoke else "cpu"
        peak = next((v[0] for k, v in GPUS.items() if k.replace("-40GB", "") in name.replace(" ", "")), None)
        if peak is None:
            peak = common.matmul_peak_flops(torch.bfloat16 if not self.args.smoke else torch.float32,
                                            *((256, 2) if self.args.smoke else (8192, 10)))
        out = []
        for side in ("lmforge", "transformers"):
            step_s, flops = time_step(kind, side, shape, self.device, 2 if self.args.smoke else 10)
            out.append(f"{side} {shape['batch'] * shape['seq'] / step_s:,.0f} tok/s MFU {flops / step_s / peak:.1%}")
        return "ok", "; ".join(out)


def time_step(kind: str, side: str, s: dict, device: str, steps: int) -> tuple[float, int]:
    """(median seconds of a bf16 training step with fused AdamW, its counted FLOPs)."""
    import transformers

    from lmforge.config import ModelConfig

    cfg = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_layers=s["layers"], num_heads=s["heads"],
               intermediate_size=s["ffn"], max_position_embeddings=max(512, s["seq"]), dropout=0.0)
    ids = torch.randint(5, s["vocab"], (s["batch"], s["seq"]), device=device)
    selected = torch.rand(s["batch"], s["seq"], device=device) < 0.15
    if side == "lmforge" and kind == "bert":
        from lmforge.models.bert import BertForMaskedLM
        model = BertForMaskedLM(ModelConfig(**cfg))
        loss = lambda m: m(ids, selected=selected, targets=ids[selected]).loss_sum / selected.sum()  # noqa: E731
    elif side == "lmforge":
        from lmforge.models.gpt import GPT
        model = GPT(ModelConfig(arch="gpt", layer_norm_eps=1e-5, **cfg))
        loss = lambda m: m(ids, targets=ids).loss_sum / ids.numel()  # noqa: E731
    elif kind == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], intermediate_size=s["ffn"], hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        loss = lambda m: m(input_ids=ids, labels=labels).loss  # noqa: E731
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
            n_positions=max(1024, s["seq"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        loss = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = torch.bfloat16

    def step():
        with torch.autocast(device_type=device, dtype=dtype):
            value = loss(model)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = common.count_flops(step)
    times = []
    for _ in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del model, opt
    return common.median(times[2:]), flops


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible: run it on a GPU machine, or --smoke for the CPU")
    common.setup(args)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="lmforge-gpu-check-") as tmp:
        c = Checks(args, Path(tmp))
        for name, fn in (("bf16", c.bf16), ("tf32", c.tf32), ("fused-adamw", c.fused_adamw),
                         ("flash-sdpa", c.flash_sdpa), ("compile", c.compile), ("fp16-resume", c.fp16_resume),
                         ("ddp", lambda: c.launched("ddp")), ("fsdp", lambda: c.launched("fsdp")),
                         ("deepspeed", lambda: c.launched("deepspeed")),
                         ("speed bert-base", lambda: c.speed("bert")), ("speed gpt2-124m", lambda: c.speed("gpt"))):
            c.run(name, fn)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    report = {"benchmark": "gpu-check", "device": device, "torch": torch.__version__, "smoke": args.smoke,
              "seconds": round(time.time() - started, 1), "results": c.rows}
    common.print_report(report, f"lmforge GPU check on {device}, torch {torch.__version__}",
                        [("check", "check", ""), ("status", "status", ""), ("seconds", "s", ".1f"),
                         ("detail", "detail", "")], args.json)
    return 0 if all(r["status"] != "FAIL" for r in c.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
