"""Checkpoint -> validated ONNX model package (graphs + tokenizer.json + notellm.json manifest)."""
