"""HF oracles for every head type: the task's BertModel (``oracle.task_model``: the PET
applied the way its method defines it) under HF's own head classes.

* classification / multi_label / regression: ``BertForSequenceClassification`` with
  ``problem_type`` single_label / multi_label / regression (logits; the activation a task
  asks for is applied here: softmax, sigmoid);
* token_classification: ``BertForTokenClassification`` (``[L, C]`` logits per token);
* embedding: ``oracle.oracle_output``.

Sentence pairs go in as ``token_type_ids``, as in a cross-encoder.
"""

from __future__ import annotations

import numpy as np
import torch
from oracle import oracle_output, task_model
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from pets.backbone import BackboneWeights, hf_config
from pets.taskstore import TaskManifest

PROBLEM = {
    "classification": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


def head_model(
    w: BackboneWeights, manifest: TaskManifest, tensors: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """The HF model of a task with its head (a ``BertModel`` for embedding heads)."""
    bert = task_model(w, manifest, tensors)
    head = manifest.head
    if not head.has_classifier:
        return bert
    cfg = BertConfig(**hf_config(w.spec), num_labels=head.num_labels)
    if head.kind == "token_classification":
        model: torch.nn.Module = BertForTokenClassification(cfg)
    else:
        cfg.problem_type = PROBLEM[head.kind]
        model = BertForSequenceClassification(cfg)
    model.classifier.weight.data = tensors["classifier.weight"].float().clone()
    model.classifier.bias.data = tensors["classifier.bias"].float().clone()
    model.bert = bert  # the PET-applied backbone (a BertModel, or PEFT's wrapper of one)
    return model.eval()


@torch.no_grad()
def head_output(
    model: torch.nn.Module,
    manifest: TaskManifest,
    tensors: dict[str, torch.Tensor],
    ids: np.ndarray,
    types: np.ndarray | None = None,
) -> np.ndarray:
    """The oracle's output for one sequence: ``[C]``, ``[L, C]`` (token heads) or ``[H]``."""
    head = manifest.head
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None, :]
    tt = (
        torch.zeros_like(x)
        if types is None
        else torch.as_tensor(np.asarray(types, dtype=np.int64))[None]
    )
    if not head.has_classifier:
        if types is None:
            return oracle_output(model, manifest, tensors, ids)
        out = model(input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=tt)
        hid = out.last_hidden_state[0]
        emb = hid.mean(0) if head.pooling == "mean" else hid[0]
        return (torch.nn.functional.normalize(emb, dim=-1) if head.normalize else emb).numpy()
    logits = model(input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=tt).logits[0]
    if head.output == "probabilities":
        logits = torch.sigmoid(logits) if head.kind == "multi_label" else logits.softmax(-1)
    return logits.numpy()
