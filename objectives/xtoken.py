"""Cross-tokenizer distillation (work in progress)."""
