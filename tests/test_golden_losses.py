"""Golden losses: a tiny run of every objective, through the CLI, gives the train losses and final
validation metrics recorded in tests/golden/losses.json (rel 1e-5; 1e-4 for Muon, whose Newton-Schulz step amplifies other CPUs' rounding), so silent numerical drift
(a refactor that changes masking, initialisation, RNG order, a loss's reduction, a schedule or
a default) fails here with the objective, the step and both values.

The runs are defined once, in tests/golden/regenerate.py, which also rewrites the golden file.
Later changes that alter these numbers must say why and regenerate in the same commit:
    .venv/bin/python tests/golden/regenerate.py
"""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("golden_regenerate",
                                               Path(__file__).resolve().parent / "golden" / "regenerate.py")
regenerate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regenerate)

GOLDEN = json.loads(regenerate.GOLDEN_FILE.read_text())
TOLERANCE = GOLDEN["tolerance"]


def rel_for(objective: str) -> float:
    """The relative tolerance of `objective`'s values: the file's default or its own entry."""
    return TOLERANCE.get("by_objective", {}).get(objective, TOLERANCE["rel"])
HOW = "if the change is meant, say why and run tests/golden/regenerate.py in the same commit"


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory):
    """Each objective run once per module (a teacher once, shared by its objective and its
    student), with an LMFORGE_CACHE of the module's own."""
    return regenerate.GoldenRuns(tmp_path_factory.mktemp("golden"))


def mismatches(objective: str, golden: dict, now: dict) -> list[str]:
    """One line per value of `now` that is not `golden`'s at the objective's tolerance (or is missing)."""
    REL = rel_for(objective)
    out = []
    want, got = golden["train_loss"], now["train_loss"]
    if len(got) != len(want):
        out.append(f"{objective}: {len(got)} train losses, golden file has {len(want)}")
    for step, (w, g) in enumerate(zip(want, got), start=1):
        if g != pytest.approx(w, rel=REL):
            rel = f" (rel diff {abs(g - w) / abs(w):.2e})" if w else ""
            out.append(f"{objective}: train loss at step {step}: golden {w!r}, now {g!r}{rel}")
    if now["validation_step"] != golden["validation_step"]:
        out.append(f"{objective}: last validation at step {now['validation_step']}, "
                   f"golden at {golden['validation_step']}")
    for key, w in golden["validation"].items():
        g = now["validation"].get(key)
        if g is None:
            out.append(f"{objective}: validation {key} at step {golden['validation_step']}: golden {w!r}, now missing")
        elif g != pytest.approx(w, rel=REL):
            out.append(f"{objective}: validation {key} at step {golden['validation_step']}: golden {w!r}, now {g!r}")
    return out


@pytest.mark.parametrize("objective", list(regenerate.OBJECTIVES))
def test_train_losses_and_final_validation_metrics_match_the_golden_file(objective, golden_runs):
    assert objective in GOLDEN["objectives"], f"{objective} is not in {regenerate.GOLDEN_FILE}; {HOW}"
    golden = GOLDEN["objectives"][objective]
    assert golden["overrides"] == regenerate.OBJECTIVES[objective]["overrides"], (
        f"{objective}: the overrides in regenerate.py are not those the golden file was made with; {HOW}")
    bad = mismatches(objective, golden, golden_runs.results(objective))
    assert not bad, f"{objective}: {len(bad)} of its golden values differ ({HOW}):\n" + "\n".join(bad[:30])


def test_a_changed_value_is_reported_with_objective_step_and_both_values():
    golden = {"train_loss": [2.0, 1.5], "validation_step": 2, "validation": {"loss": 1.25, "accuracy": 0.5}}
    now = {"train_loss": [2.0, 1.5 * (1 + 3e-5)], "validation_step": 2, "validation": {"loss": 1.25 * (1 + 5e-6)}}
    assert rel_for("mlm") == 1e-5
    assert mismatches("mlm", golden, now) == [
        f"mlm: train loss at step 2: golden 1.5, now {1.5 * (1 + 3e-5)!r} (rel diff 3.00e-05)",
        "mlm: validation accuracy at step 2: golden 0.5, now missing"]


def test_muon_has_its_own_wider_tolerance_and_no_other_objective_does():
    assert rel_for("llama-relu2-muon") == 1e-4
    assert set(TOLERANCE["by_objective"]) == {"llama-relu2-muon"}
    assert TOLERANCE == regenerate.TOLERANCE  # the file says what regenerate.py writes
