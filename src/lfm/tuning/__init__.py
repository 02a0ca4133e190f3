"""Model tuning: weight engineering (fine-tuning, adapters), input engineering (prompt and
instruction tuning) and database augmentation (retrieval). Methods register on import."""
