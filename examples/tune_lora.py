"""LoRA on SmolLM2-135M for 5-way BBC News topic classification through label words.

    python examples/tune_lora.py            # about a minute or two on a 2-core CPU

Trains rank-8 LoRA adapters on q_proj/v_proj (paper defaults) with 8 examples per class, prints the
held-out accuracy before and after, saves the adapter in PEFT's format and reloads it with PEFT.
"""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel

from lfm.assets import load_dataset, load_model
from lfm.core.train import TrainConfig
from lfm.tuning.classify import VerbalizerLM, accuracy_fn, class_batches
from lfm.tuning.peft_methods import LoraCfg
from lfm.tuning.tasks import bbc_verbalizer, few_shot
from lfm.tuning.trainer import classifier, save_tuned, trainable_parameters, tune

torch.set_num_threads(2)
data, handle = load_dataset("bbc-news"), load_model("smollm2-135m")
verb = bbc_verbalizer(data.classes)


def prompt(text: str) -> str:
    return verb.template.format(text=text[:300].strip())


texts, y = few_shot(data, k=8, seed=0)
train_batches = class_batches(handle.tokenizer, [prompt(t) for t in texts], y, batch_size=4)
idx = [i for c in range(5) for i in (data.y_test == c).nonzero().flatten()[:6].tolist()]
held_out = class_batches(
    handle.tokenizer, [prompt(data.test_texts[i]) for i in idx], data.y_test[idx], 8
)
accuracy = accuracy_fn(held_out)

cfg = LoraCfg()  # r=8, α=16, dropout 0.05, PEFT's Llama targets (q_proj, v_proj)
clf = classifier(handle, "lora", cfg, label_words=verb.label_words)
print(f"trainable parameters: {trainable_parameters(clf):,}")
print(f"zero-shot accuracy:   {accuracy(clf):.3f}")
tune(clf, train_batches, cfg, TrainConfig(steps=10, lr=1e-3))
print(f"LoRA accuracy:        {accuracy(clf):.3f}")

with tempfile.TemporaryDirectory() as tmp:
    save_tuned(clf, tmp)  # refuses an empty adapter
    again = VerbalizerLM(
        PeftModel.from_pretrained(load_model("smollm2-135m").model, f"{tmp}/adapter"), clf.label_ids
    )
    print(f"reloaded with PEFT:   {accuracy(again):.3f}")
