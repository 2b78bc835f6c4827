"""Continued (domain-adaptive) pretraining: model.init_from for task.name=mlm and clm, and the
`train-texts:DATASET` corpus of a fine-tuning split's train texts."""

import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, tiny_finetune_config
from lmforge.data.corpora import open_corpus
from lmforge.data.sentiment import load_labeled, stratified_split
from lmforge.errors import LmforgeError
from lmforge.jobs import finetune, pretrain
from lmforge.tasks.loading import load_model, source_path


def _reviews(path, n):
    rng = random.Random(0)
    rows = ["text\tlabel"] + [f"the cat number {i} is {'red' if y else 'dog'} .\t{y}"
                              for i, y in ((i, rng.randint(0, 1)) for i in range(n))]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_train_texts_are_the_fine_tuning_train_split_and_never_its_validation_or_test(tmp_path):
    data_path = _reviews(tmp_path / "r.tsv", 100)
    data = load_labeled(str(data_path))
    for spec, seed in ((f"train-texts:{data_path}", 1234), (f"train-texts:{data_path}:7", 7)):
        split = stratified_split([e.label for e in data.examples], seed)
        texts = [text for _, text in open_corpus(spec).documents()]
        assert texts == [data.examples[i].text for i in split["train"]]
        held_out = {data.examples[i].text for i in split["validation"] + split["test"]}
        assert held_out and not held_out & set(texts)
    # another split seed is another corpus (its cache key differs)
    assert open_corpus(f"train-texts:{data_path}").identity != open_corpus(f"train-texts:{data_path}:7").identity


def test_an_evaluation_only_set_is_refused_as_a_corpus():
    with pytest.raises(LmforgeError, match="vader-tweets is for evaluation only"):
        open_corpus("train-texts:vader-tweets")


def test_continuing_an_mlm_run_starts_from_its_weights_and_shape(tiny_prepared, tmp_path):
    source, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "source", "train.max_steps=4"))
    # a shape in the config that differs from the source's is replaced by the source's
    run_dir, summary = pretrain(tiny_config(tiny_prepared, tmp_path / "continued", f"model.init_from={source}",
                                            "model.hidden_size=64", "train.max_steps=2"))
    trained = load_file(source / "checkpoints" / "step_00000004" / "model.safetensors")
    start = load_file(run_dir / "checkpoints" / "step_00000000" / "model.safetensors")
    assert set(start) == set(trained) and all(torch.equal(start[k], trained[k]) for k in trained)
    assert load_model(run_dir).config.hidden_size == 32 and summary["steps"] == 2


def test_continuing_minilm_loads_its_encoder_and_starts_a_seeded_head_tied_to_its_embeddings(
        tiny_prepared, tmp_path, capsys):
    def start(name, seed):
        cfg = tiny_config(tiny_prepared, tmp_path / name, "model.init_from=minilm", "data.tokenizer=bert-base-uncased",
                          "train.max_steps=1", f"train.seed={seed}", "train.eval_batches=1")
        cfg.data.corpus = f"train-texts:{_reviews(tmp_path / 'r.tsv', 200)}"
        run_dir, _ = pretrain(cfg)
        return load_file(run_dir / "checkpoints" / "step_00000000" / "model.safetensors")

    a, b, c = start("a", 0), start("b", 0), start("c", 1)
    assert "model.init_from=minilm has no trained mlm_head" in capsys.readouterr().err
    encoder = load_model(source_path("minilm"), mlm_head_required=False).model.state_dict()
    encoder_keys = [k for k in encoder if k.startswith("bert.")]
    assert encoder_keys and all(torch.equal(a[k], encoder[k]) for k in encoder_keys)
    # the decoder is the (loaded) token embedding matrix itself; the head's own layers start seeded
    assert not any("decoder" in k for k in a)
    assert torch.equal(a["mlm_head.dense.weight"], b["mlm_head.dense.weight"])
    assert not torch.equal(a["mlm_head.dense.weight"], c["mlm_head.dense.weight"])


def test_a_classifier_fine_tunes_from_a_continued_run(tiny_prepared, tmp_path):
    data_path = _reviews(tmp_path / "r.tsv", 300)
    cfg = tiny_config(tiny_prepared, tmp_path / "dapt", "train.max_steps=3", "train.eval_batches=1",
                      f"data.tokenizer={tiny_prepared.folder / 'tokenizer.json'}")
    cfg.data.corpus = f"train-texts:{data_path}"
    source, _ = pretrain(cfg)
    run_dir, summary = finetune(tiny_finetune_config(tiny_prepared, tmp_path, data_path, f"model.init_from={source}",
                                                     "train.max_steps=2", "classify.evaluate_ood=false"))
    assert summary["steps"] == 2


@pytest.mark.parametrize("task, match", [
    ("electra", "task.name=electra starts from random weights; model.init_from is for task.name=mlm and clm"),
    ("clm", "task.name=clm trains a decoder"),
])
def test_init_from_a_model_the_objective_cannot_continue_is_refused_in_one_line(tiny_prepared, tmp_path, task, match):
    source, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "source", "train.max_steps=1"))
    with pytest.raises(LmforgeError, match=match):
        pretrain(tiny_config(tiny_prepared, tmp_path / "next", f"task.name={task}", f"model.init_from={source}",
                             "train.max_steps=1"))


def test_a_tokenizer_other_than_the_sources_is_refused(tiny_prepared, tmp_path):
    source, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "source", "train.max_steps=1"))
    cfg = tiny_config(tiny_prepared, tmp_path / "next", f"model.init_from={source}", "data.tokenizer=gpt2",
                      "train.max_steps=1")
    with pytest.raises(LmforgeError, match="data.tokenizer=gpt2 .* does not match the tokenizer of model.init_from"):
        pretrain(cfg)
