"""Model tuning: weight engineering (fine-tuning, adapters), input engineering (prompt and
instruction tuning) and database augmentation (retrieval). Methods register on import."""

from lfm.tuning import bbt, methods, mezo, peft_methods, prompt_search, retrieval  # noqa: F401
