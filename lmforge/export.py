"""`lmforge export`: write a model as a Hugging Face transformers directory.

The directory holds config.json, model.safetensors (transformers names, decoder tied to the word
embeddings) and the tokenizer (tokenizer.json, vocab.txt, tokenizer_config.json,
special_tokens_map.json), so that `AutoModelForMaskedLM.from_pretrained(DIR)` (pretraining runs)
or `AutoModel.from_pretrained(DIR)` (fine-tuned encoders), `AutoTokenizer.from_pretrained(DIR)`
and `pipeline("fill-mask", model=DIR)` work offline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.data.shards import check_out_dir
from lmforge.data.tokenizers import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.models.family import SpecialIds
from lmforge.models.hf import electra_to_hf_state_dict, hf_config_from_model
from lmforge.models.registry import family
from lmforge.tasks.loading import load_model
from lmforge.runs.checkpoint import clean_state_dict


def write_hf_tokenizer(tokenizer: TextTokenizer, out: Path, max_len: int) -> None:
    tokenizer.save(out / "tokenizer.json")
    if tokenizer.kind == "gpt2":  # transformers reads the fast tokenizer from tokenizer.json
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_len, "add_prefix_space": False,
                  **special}
    else:
        vocab = sorted(tokenizer.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
        special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                   "mask_token": "[MASK]"}
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": max_len, **special}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def bert_sequence_classifier(encoder_cfg: dict, encoder: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                             labels: tuple[str, ...]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A BertForSequenceClassification from a BERT classifier with BERT's pooler
    (model.classifier_pooling=pooler): the BertModel tensors under "bert.", the pooler, the
    polarity head as `classifier`, and id2label / label2id from the run's class names. The rating
    head has no transformers counterpart and stays in the run."""
    tensors = {f"bert.{k}": v for k, v in encoder.items()}
    tensors.update({"bert.pooler.dense.weight": state["pooler.weight"], "bert.pooler.dense.bias": state["pooler.bias"],
                    "classifier.weight": state["polarity.weight"], "classifier.bias": state["polarity.bias"]})
    config = {**encoder_cfg, "architectures": ["BertForSequenceClassification"], "num_labels": len(labels),
              "id2label": {str(i): name for i, name in enumerate(labels)},
              "label2id": {name: i for i, name in enumerate(labels)},
              "problem_type": "single_label_classification"}
    return config, tensors


def export_hf(model_path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Export the model at `model_path` to `out`, by its family's `to_hf` (lmforge/models/family.py).
    A pretraining run (or a transformers directory) becomes its family's masked or causal LM
    (BertForMaskedLM, ModernBertForMaskedLM, DebertaV2ForMaskedLM, GPT2LMHeadModel,
    LlamaForCausalLM, ...); an ELECTRA run its discriminator (ElectraForPreTraining); a fine-tuning
    run its encoder (BertModel, ...: load it with `AutoModel`; the classifier heads are lmforge's
    own and stay in the run), or, for a BERT classifier with BERT's pooler
    (model.classifier_pooling=pooler), a BertForSequenceClassification with the run's id2label.
    Refuses to overwrite an existing `out` unless `force`, and a model transformers cannot
    express, in one line; writes a temporary folder first."""
    out = Path(out)
    check_out_dir(out, force)
    labels = None
    if (Path(model_path) / "dataset.json").is_file():  # a fine-tuning run: its encoder, or its whole classifier
        from lmforge.tasks.classify import load_classifier, read_labels

        cfg, tokenizer, classifier = load_classifier(model_path)
        model_cfg, fam = cfg.model, family(cfg.model.arch)
        state, encoder_only, electra = clean_state_dict(classifier), True, None
        labels = read_labels(Path(model_path))
    else:
        loaded = load_model(model_path, mlm_head_required=False)
        model_cfg, tokenizer, fam = loaded.config, loaded.tokenizer, family(loaded.config.arch)
        state, encoder_only, electra = clean_state_dict(loaded.model), False, loaded.electra
    refusal = fam.export_refusal(model_cfg)
    if refusal:
        raise LmforgeError(f"cannot export {model_path}: {refusal}")
    if electra is not None:  # an ELECTRA run: its discriminator, with the replaced-token head
        hf_cfg = hf_config_from_model(model_cfg, "ElectraForPreTraining", pad_token_id=tokenizer.pad_id)
        # the same encoder under transformers' ELECTRA names
        hf_cfg.update(model_type="electra", embedding_size=model_cfg.hidden_size, tie_word_embeddings=False)
        tensors = electra_to_hf_state_dict(clean_state_dict(electra))
    else:
        special = SpecialIds(pad=tokenizer.pad_id, cls=tokenizer.cls_id, sep=tokenizer.sep_id,
                             mask=tokenizer.mask_id, eot=tokenizer.eot_id)
        hf_cfg, tensors = fam.to_hf(state, model_cfg, special, encoder_only)
        if labels is not None and model_cfg.arch == "bert" and model_cfg.classifier_pooling == "pooler":
            hf_cfg, tensors = bert_sequence_classifier(hf_cfg, tensors, state, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_hf_tokenizer(tokenizer, tmp, model_cfg.max_position_embeddings)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
