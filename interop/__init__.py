"""Hugging Face interop: import/export Llama, Mistral, Qwen2 and Qwen3 checkpoints and tokenizers.

Modules: hf_config (config.json <-> ModelConfig), hf_weights (tensor names, streaming
safetensors), tokenizers (tokenizer.json / tokenizer.model + chat templates), load (one loader for
Tessera run directories and HF directories), hf (the `import` / `export` command). See
docs/interop.md.
"""
