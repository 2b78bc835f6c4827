"""Hugging Face interop for BERT: parity with transformers, both directions, and safe loading."""

import pickle

import pytest
import torch
import transformers

from conftest import PicklePayload, tiny_config
from lmforge.data.tokenizers import minilm_model_dir
from lmforge.errors import LmforgeError
from lmforge.export import export_hf
from lmforge.models.hf import from_hf_state_dict, to_hf_state_dict
from lmforge.tasks.loading import load_model
from lmforge.jobs import pretrain


def _padded_batch(vocab, lengths=(12, 7, 3), seed=0, low=999):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(low, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def test_minilm_hidden_states_match_transformers_bertmodel_with_padding():
    folder = minilm_model_dir()
    ref = transformers.BertModel.from_pretrained(folder).eval()
    loaded = load_model(folder, mlm_head_required=False)
    assert loaded.source == "hf" and any("no masked-LM head" in n for n in loaded.notes)
    ids, mask = _padded_batch(30522)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = loaded.model.bert(ids, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5
    assert (ours - theirs).abs().max().item() <= 1e-5  # padded positions too


def test_random_hf_bert_for_masked_lm_loads_with_identical_logits(tmp_path):
    cfg = transformers.BertConfig(vocab_size=1200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped name would show
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("".join(f"[unused{i}]\n" for i in range(995)) +
                                               "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n" +
                                               "".join(f"w{i}\n" for i in range(200)))
    loaded = load_model(tmp_path / "hf")
    assert loaded.notes == [] or all("not used" in n for n in loaded.notes)
    ids, mask = _padded_batch(1200)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).logits
        ours = loaded.model(ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() <= 1e-4


@pytest.mark.parametrize("nsp", [False, True])
def test_exported_run_loads_in_transformers_with_the_same_logits_and_fill_mask_works(tiny_prepared, tmp_path, nsp):
    # a mlm.nsp run exports its MLM model (BertForMaskedLM has no pooler or next-sentence head)
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "runs", "train.max_steps=4", f"mlm.nsp={nsp}"))
    out = export_hf(run_dir, tmp_path / "export")
    ref = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    ours = load_model(run_dir).model
    vocab = ours.cfg.vocab_size
    ids, mask = _padded_batch(vocab, lengths=(20, 9), low=5)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-4
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out))
    answers = fill("the cat [MASK] the hill.")
    assert len(answers) == 5 and all("token_str" in a for a in answers)
    with pytest.raises(LmforgeError, match="already exists"):
        export_hf(run_dir, out)


def test_name_maps_round_trip():
    names = {"bert.layers.3.attention.query.weight": torch.zeros(1), "mlm_head.bias": torch.zeros(1),
             "bert.embeddings.norm.bias": torch.zeros(1)}
    back, ignored = from_hf_state_dict(to_hf_state_dict(names))
    assert set(back) == set(names) and ignored == []


def test_a_pickle_that_runs_code_is_refused_as_pytorch_model_bin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf = tmp_path / "evil"
    hf.mkdir()
    transformers.BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=16).to_json_file(hf / "config.json")
    with open(hf / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.word_embeddings.weight": PicklePayload()}, f)
    with pytest.raises(LmforgeError, match="refusing .*pytorch_model.bin"):
        load_model(hf)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
