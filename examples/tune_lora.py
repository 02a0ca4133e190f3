"""LoRA on SmolLM2-135M for 5-way BBC News topic classification through label words.

    python examples/tune_lora.py            # a few minutes on a 2-core CPU

Trains rank-8 LoRA adapters on q_proj/v_proj (paper defaults) with 8 examples per class through
the `lora` tuner, prints the held-out accuracy before and after, saves the result (the adapter in
PEFT's format) and reloads the adapter with PEFT.
"""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel

from lfm.assets import load_dataset, load_model
from lfm.core.train import TrainConfig
from lfm.tuning.classify import VerbalizerLM
from lfm.tuning.peft_methods import LoraConfig, lora
from lfm.tuning.tasks import TextClassification, bbc_verbalizer, few_shot, held_out
from lfm.tuning.trainer import evaluator

torch.set_num_threads(2)
data, handle = load_dataset("bbc-news"), load_model("smollm2-135m")
verb = bbc_verbalizer(data.classes, max_chars=300)
train = TextClassification(*few_shot(data, k=8, seed=0), verb)
test = TextClassification(*held_out(data, per_class=6), verb)

cfg = LoraConfig()  # r=8, α=16, dropout 0.05, PEFT's Llama targets (q_proj, v_proj)
res = lora(handle, train, cfg, train_cfg=TrainConfig(steps=10, lr=1e-3), eval_data=test)
print(f"trainable parameters: {res.metrics['trainable_parameters']:,}")
print(f"zero-shot accuracy:   {res.metrics['zero_shot_acc']:.3f}")
print(f"LoRA accuracy:        {res.metrics['acc']:.3f}")

with tempfile.TemporaryDirectory() as tmp:
    res.save(tmp)  # result.json and adapter/ (an empty adapter is refused)
    again = PeftModel.from_pretrained(load_model("smollm2-135m").model, f"{tmp}/adapter")
    reloaded = VerbalizerLM(again, res.model.label_ids)
    print(f"reloaded with PEFT:   {evaluator(handle.tokenizer, test)(reloaded)['acc']:.3f}")
