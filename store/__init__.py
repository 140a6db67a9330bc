"""Run directories: the resolved config, orbax checkpoints, tokenizer files."""
