"""Model editing: memory-based editing, constrained tuning, locate-and-edit and meta-learned
editors. Methods register on import."""
