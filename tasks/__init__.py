"""Downstream tasks on top of the decoder LM: text classification (tasks.classify) and
language-model evaluation (tasks.lm_eval: perplexity, bits per byte, multiple choice)."""
