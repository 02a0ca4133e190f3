"""Model tuning: weight engineering (fine-tuning, adapters), input engineering (prompt and
instruction tuning) and database augmentation (retrieval).

Every method is a tuner `(handle, data, cfg) -> TuneResult`, registered by name (`lfm methods
--area tuning`; `lfm.registry.run("tuning", name, handle, data, cfg=...)`); `data` is one of the
tasks below. Methods register on import.
"""

from lfm.tuning import (  # noqa: F401  (registers the methods)
    augmented,
    bbt,
    lora_plus,
    methods,
    mezo,
    opro,
    peft_methods,
    prompt_search,
)
from lfm.tuning.results import TunedModel, TuneResult
from lfm.tuning.tasks import Corpus, Documents, Instructions, TextClassification, Verbalizer

__all__ = [
    "Corpus",
    "Documents",
    "Instructions",
    "TextClassification",
    "TuneResult",
    "TunedModel",
    "Verbalizer",
]
