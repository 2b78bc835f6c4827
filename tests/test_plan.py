"""The planning and reporting verbs: `lmforge plan` (Chinchilla compute-optimal sizes, Hoffmann et al.
2022 Approach 3), `lmforge plot-schedule` and `lmforge report` (runs compared)."""

import json
import math

import pytest

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.registry import build_model
from lmforge.plan import EXP_D, EXP_N, chinchilla_loss, closest_shape, compute_optimal, count_params, plan


@pytest.mark.parametrize("flops", [1e15, 1e19, 5.76e23])
def test_compute_optimal_spends_the_budget_and_minimises_the_fitted_loss_along_it(flops):
    n, d = compute_optimal(flops)
    assert 6 * n * d == pytest.approx(flops, rel=1e-9)
    best = chinchilla_loss(n, d)
    for f in (0.8, 0.95, 1.05, 1.25):  # any other split of the same compute is worse
        assert chinchilla_loss(n * f, d / f) > best
    assert EXP_N == pytest.approx(0.4516, abs=1e-4) and EXP_D == pytest.approx(0.5484, abs=1e-4)


def test_chinchilla_budget_gives_about_chinchillas_size():
    # Chinchilla itself: 70B parameters, 1.4T tokens, 5.76e23 FLOPs. Approach 3 gives a smaller
    # model on more tokens at that budget (their Table 3: 40B-ish); it must land in that range.
    n, d = compute_optimal(6 * 70e9 * 1.4e12)
    assert 25e9 < n < 70e9 and d > 1.4e12


def test_parameter_counts_match_the_models_lmforge_builds():
    for arch, vocab in (("bert", 1000), ("gpt", 777)):
        cfg = ModelConfig(arch=arch, vocab_size=vocab, hidden_size=128, num_layers=2, num_heads=2,
                          intermediate_size=512, max_position_embeddings=512)
        assert count_params(arch, 2, 128, vocab) == sum(p.numel() for p in build_model(cfg).parameters())


def test_closest_shape_is_nearest_on_a_log_scale():
    base = count_params("bert", 12, 768, 30522)  # BERT-base, ~110M
    assert 105e6 < base < 115e6
    shape = closest_shape(base * 1.2, "bert", 30522)
    assert (shape.num_layers, shape.hidden_size, shape.num_heads) == (12, 768, 12)
    assert "model.intermediate_size=3072" in shape.overrides("bert")


def test_plan_from_hours_and_a_given_throughput_takes_those_hours():
    p = plan(hours=2.0, tokens_per_s=10_000.0)
    assert p["hours"] == pytest.approx(2.0, rel=1e-9)
    assert p["tokens"] == pytest.approx(10_000 * 2 * 3600, rel=1e-9)
    p = plan(flops=1e18, flops_per_s=50e9)  # a measured 50 GFLOP/s
    assert p["hours"] == pytest.approx(1e18 / 50e9 / 3600)
    assert p["rule_of_thumb"]["tokens"] == pytest.approx(20 * p["rule_of_thumb"]["params"])
    assert p["coefficients"] == {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    with pytest.raises(LmforgeError, match="exactly one"):
        plan(tokens_per_s=1.0)
    with pytest.raises(LmforgeError, match="positive"):
        plan(flops=math.nan, tokens_per_s=1.0)


def test_plan_verb_prints_a_plan_and_json(capsys):
    assert main(["plan", "--flops", "1e18", "--tokens-per-s", "5000"]) == 0
    out = capsys.readouterr().out
    assert "compute-optimal (Chinchilla Approach 3)" in out and "model.num_layers=" in out
    assert main(["plan", "--hours", "1", "--tokens-per-s", "5000", "--json", "--arch", "gpt", "--vocab", "50257"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["closest"]["arch"] == "gpt" and p["hours"] == pytest.approx(1.0)
    assert main(["plan", "--flops", "0", "--tokens-per-s", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: --flops must be a positive number")


def test_measured_throughput_is_a_positive_flop_rate():
    from lmforge.plan import measured_flops_per_s

    assert 1e8 < measured_flops_per_s(seconds=0.2, device="cpu", precision="fp32") < 1e14


def _spy_on_measurement(monkeypatch, precision: str):
    """Make the loop's resolvers return cpu / `precision` while recording their arguments, and
    record the autocast state inside every GPT forward of the throughput measurement."""
    import torch

    import lmforge.plan
    import lmforge.train.loop
    import lmforge.train.machine
    from lmforge.models.gpt import GPT

    seen = {"device_specs": [], "precision_args": [], "forwards": []}
    real_resolve_device, real_forward, real_measure = (lmforge.train.loop.resolve_device, GPT.forward,
                                                       lmforge.plan.measure_throughput)

    def resolve_device(spec):
        seen["device_specs"].append(spec)
        seen["resolved"] = real_resolve_device("cpu")
        return seen["resolved"]

    def resolve_precision(device, spec):
        seen["precision_args"].append((device, spec))
        return precision

    def forward(self, input_ids, *args, **kwargs):
        seen["forwards"].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                                 input_ids.device, next(self.parameters()).device))
        return real_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(lmforge.train.loop, "resolve_device", resolve_device)
    monkeypatch.setattr(lmforge.train.machine, "resolve_precision", resolve_precision)
    monkeypatch.setattr(GPT, "forward", forward)
    # the plan's own call, only shorter
    monkeypatch.setattr(lmforge.plan, "measure_throughput",
                        lambda seconds=2.0, device=None, precision=None: real_measure(0.05, device, precision))
    return seen


def test_plan_measures_on_the_resolved_device_under_the_loops_bf16_autocast_and_says_so(monkeypatch):
    import torch

    from lmforge.plan import format_plan

    seen = _spy_on_measurement(monkeypatch, "bf16")
    p = plan(flops=1e18)  # no throughput given: measured, with train.device / train.precision's defaults
    assert seen["device_specs"] == ["auto"]
    assert seen["precision_args"] == [(seen["resolved"], "auto")]  # the resolved device, not the spec
    assert seen["precision_args"][0][0] is seen["resolved"]  # that very object, not another cpu
    assert len(seen["forwards"]) >= 4  # 2 warm-up steps and at least 2 timed ones
    for autocast_on, dtype, ids_device, weights_device in seen["forwards"]:
        assert autocast_on and dtype == torch.bfloat16
        assert ids_device == weights_device == seen["resolved"]
    assert p["measured_on"] == {"device": "cpu", "precision": "bf16"}
    assert p["hours"] == pytest.approx(1e18 / p["measured_flops_per_s"] / 3600)
    assert "measured on cpu in bf16" in format_plan(p)


def test_plan_measures_fp32_without_autocast_and_passes_the_device_and_precision_asked_for(monkeypatch, capsys):
    seen = _spy_on_measurement(monkeypatch, "fp32")
    p = plan(hours=1.0, device="cpu", precision="fp32")
    assert seen["device_specs"] == ["cpu"] and seen["precision_args"] == [(seen["resolved"], "fp32")]
    assert seen["forwards"] and not any(autocast_on for autocast_on, *_ in seen["forwards"])
    assert p["measured_on"] == {"device": "cpu", "precision": "fp32"}
    assert p["flops"] == pytest.approx(p["measured_flops_per_s"] * 3600)
    # the verb's text names where the throughput was measured
    assert main(["plan", "--flops", "1e18"]) == 0
    assert "GFLOP/s measured on cpu in fp32" in capsys.readouterr().out


def test_plan_given_a_throughput_measures_nothing_and_names_no_device(monkeypatch):
    seen = _spy_on_measurement(monkeypatch, "bf16")
    assert "measured_on" not in plan(flops=1e18, flops_per_s=50e9)
    assert "measured_on" not in plan(flops=1e18, tokens_per_s=5e3)
    assert seen["device_specs"] == [] and seen["forwards"] == []


def test_plot_schedule_draws_the_loops_learning_rates_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert main(["plot-schedule", "train.max_steps=100", "optim.warmup_frac=0.1", "optim.lr=0.002",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "peak 0.002 at step 10" in capsys.readouterr().out  # the end of warmup, as lr_at has it
    before = out.read_bytes()
    assert main(["plot-schedule", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["plot-schedule", "--out", str(tmp_path / "lr.txt")]) == 2
    assert main(["plot-schedule", "optim.schedule=cosine", "--out", str(out), "--force"]) == 0
    assert "cosine:" in capsys.readouterr().out


def test_report_compares_runs_in_a_png_and_a_self_contained_html_page(tiny_prepared, tmp_path, capsys):
    from conftest import tiny_config
    from lmforge.jobs import pretrain

    a, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "a", "train.max_steps=4", "train.eval_every=2"))
    b, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "b", "train.max_steps=4", "train.eval_every=2",
                                "optim.lr=3e-3"))
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    png, page = out.with_suffix(".png"), out.with_suffix(".html").read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in page and a.name in page and b.name in page
    assert "<td>optim.lr</td><td>0.001</td><td>0.003</td>" in page  # the one config key that differs
    assert "val_loss" in page
    assert main(["report", str(a), "--out", str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not an lmforge run directory" in capsys.readouterr().err
