"""What every model family promises, run through the real verbs on a tiny corpus: a pretraining run
resumes bit for bit after SIGINT, exports to transformers with equal logits (fill-mask or greedy
generation matching), loads back, and an encoder is fine-tuned from its run. BERT and GPT have
their own tests of the same promises (test_models_hf.py, test_clm.py, test_kill_resume.py)."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import interrupt_during_step, tiny_config
from lmforge.errors import LmforgeError
from lmforge.eval.generate import generate
from lmforge.export import export_hf
from lmforge.jobs import finetune, pretrain, resume
from lmforge.models.registry import ARCHS, family
from lmforge.tasks.loading import load_model
from lmforge.train.log import read_metrics

# the families beyond BERT and GPT-2, with the settings that make each one's own code run at tiny size
NEW = {
    "modernbert": ["model.local_window=8", "model.global_every=2", "model.layer_norm_eps=1e-5"],
    "deberta": ["model.position_buckets=8", "model.max_relative_positions=16", "model.layer_norm_eps=1e-7"],
    "llama": ["model.num_kv_heads=1", "model.layer_norm_eps=1e-6", "model.qk_norm=true", "model.tie_embeddings=false",
              "task.name=clm", "clm.sample_tokens=4"],
}
TRANSFORMERS_CLASS = {"modernbert": "ModernBertForMaskedLM", "deberta": "DebertaV2ForMaskedLM",
                      "llama": "Qwen3ForCausalLM"}


def test_every_family_in_the_registry_is_tested_here_or_in_its_own_files():
    assert set(ARCHS) == {"bert", "gpt", *NEW}


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


def _config(tiny_prepared, out, arch, *more):
    return tiny_config(tiny_prepared, out, f"model.arch={arch}", *NEW[arch], "model.dropout=0", *more)


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    """arch -> a finished 12-step run of it (trained once for the tests below)."""
    out = tmp_path_factory.mktemp("families")
    return {arch: pretrain(_config(tiny_prepared, out / arch, arch))[0] for arch in NEW}


@pytest.mark.parametrize("arch", NEW)
def test_a_run_resumes_bit_exact_after_sigint(tiny_prepared, tmp_path, monkeypatch, runs, arch):
    task = family(arch).kind == "decoder" and "clm" or "mlm"
    from lmforge.tasks.registry import objective

    interrupt_during_step(monkeypatch, objective(task), 8)  # stops at its step-6 checkpoint
    cut, summary = pretrain(_config(tiny_prepared, tmp_path, arch))
    assert summary["stopped_by"] == "signal"
    monkeypatch.undo()
    resume(cut)
    assert _losses(cut) == _losses(runs[arch]) and len(_losses(cut)) == 12


@pytest.mark.parametrize("arch", NEW)
def test_the_export_loads_in_transformers_with_equal_logits_and_its_pipeline_agrees(runs, tmp_path, arch):
    run = runs[arch]
    out = export_hf(run, tmp_path / "hf")
    ours = load_model(run).model
    auto = transformers.AutoModelForCausalLM if family(arch).kind == "decoder" else transformers.AutoModelForMaskedLM
    ref = auto.from_pretrained(out).eval()
    assert type(ref).__name__ == TRANSFORMERS_CLASS[arch]
    vocab = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, 20), generator=g)
    if family(arch).kind == "decoder":
        with torch.no_grad():
            assert (ours(ids).logits[..., :vocab] - ref(ids).logits).abs().max().item() <= 1e-4
        prompt = ids[0, :6].tolist()
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 6:]
        assert generate(ours, prompt, max_new_tokens=10, temperature=0)[0] == theirs.tolist()
    else:
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # a padded row
        with torch.no_grad():
            a = ours(ids, attention_mask=mask).logits
            b = ref(input_ids=ids, attention_mask=mask).logits
        assert (a - b)[mask.bool()].abs().max().item() <= 1e-4
        from lmforge.data.tokenizers import load_tokenizer
        from lmforge.eval.predict import fill_mask

        fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out))
        theirs = fill("the cat [MASK] the hill .")
        mine = fill_mask(ours, load_tokenizer(str(run / "tokenizer.json")), ["the cat [MASK] the hill ."])[0][0]
        assert [a["token"] for a in theirs] == [m["id"] for m in mine]  # the same five, in the same order
        assert [a["score"] for a in theirs] == pytest.approx([m["prob"] for m in mine], abs=1e-4)
    # and back: the transformers directory is read by the family's from_hf
    again = load_model(out).model
    with torch.no_grad():
        if family(arch).kind == "decoder":
            assert torch.allclose(again(ids).logits[..., :vocab], ours(ids).logits[..., :vocab], atol=1e-5)
        else:
            assert torch.allclose(again(ids).logits, ours(ids).logits, atol=1e-5)


@pytest.mark.parametrize("arch", [a for a in NEW if family(a).kind == "encoder"])
def test_an_encoder_run_is_fine_tuned_into_a_classifier_and_its_encoder_exports(runs, tiny_prepared, tmp_path, arch):
    reviews = tmp_path / "reviews.tsv"
    good, bad = ["good", "great", "fine"], ["bad", "awful", "poor"]
    rows = [f"the cat is {(good if i % 2 else bad)[i % 3]} .\t{i % 2}" for i in range(120)]
    reviews.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    cfg = tiny_config(tiny_prepared, tmp_path / "ft", "task.name=classify", f"data.dataset={reviews}",
                      f"model.init_from={runs[arch]}", "train.batch_size=16", "train.max_steps=60",
                      "train.eval_every=60", "train.checkpoint_every=60", "optim.lr=3e-3")
    run_dir, summary = finetune(cfg)
    assert summary["test_accuracy"] >= 0.9  # a separable task: the encoder carries the words to [CLS]
    loaded = load_model(run_dir, classifier_ok=True)
    assert loaded.config.arch == arch and loaded.model.encoder_attr == family(arch).encoder_attr
    out = export_hf(run_dir, tmp_path / "encoder")  # the encoder alone, as transformers' base model
    base = transformers.AutoModel.from_pretrained(out).eval()
    ids = torch.randint(5, loaded.config.vocab_size, (2, 10))
    with torch.no_grad():
        theirs = base(input_ids=ids).last_hidden_state
        mine = loaded.model.encoder(ids)
    assert (mine - theirs).abs().max().item() <= 1e-4


def test_task_and_family_mismatches_are_one_line_errors(tiny_prepared, tmp_path):
    with pytest.raises(LmforgeError, match=r"task.name=clm trains a.* decoder .*not model.arch=modernbert"):
        pretrain(tiny_config(tiny_prepared, tmp_path, "task.name=clm", "model.arch=modernbert"))
    with pytest.raises(LmforgeError, match="mlm.nsp .* BERT's"):
        pretrain(tiny_config(tiny_prepared, tmp_path, "model.arch=deberta", "mlm.nsp=true"))
    with pytest.raises(LmforgeError, match="task.name=electra trains model.arch=bert only"):
        pretrain(tiny_config(tiny_prepared, tmp_path, "task.name=electra", "model.arch=modernbert"))
    with pytest.raises(LmforgeError, match="model.arch='roberta' is not known"):
        pretrain(tiny_config(tiny_prepared, tmp_path, "model.arch=roberta"))
