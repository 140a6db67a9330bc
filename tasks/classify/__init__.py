"""Text classification: CSV data (dataset), the embedded stdlib default (stdlib_dataset) and a
harder short-text check (stdlib_sentences), the pooled classifier head with its dropout (model),
fine-tuning (train), keeping the best evaluation (best), the TF-IDF + logistic-regression
baseline (baseline), metrics and plots (metrics, plots), and checkpoint evaluation (evaluate)."""
