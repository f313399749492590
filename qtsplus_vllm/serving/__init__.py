"""vLLM-facing layer: plugin registration targets, processor, model, video loader."""
