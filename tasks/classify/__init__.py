"""Text classification: CSV data (dataset), the embedded stdlib default (stdlib_dataset), the
pooled classifier head (model), fine-tuning (train), metrics and plots (metrics, plots), and
checkpoint evaluation (evaluate)."""
