"""Model tuning: weight engineering (fine-tuning, adapters), input engineering (prompt and
instruction tuning) and database augmentation (retrieval). Methods register on import."""
from lfm.tuning import methods, peft_methods  # noqa: F401  (gradient-based methods register)
