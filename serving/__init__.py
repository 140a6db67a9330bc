"""int8 serving: paged KV cache, jitted prefill/decode, continuous batching, OpenAI-compatible HTTP."""
