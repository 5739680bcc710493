"""notellm-stream worker: the streaming runtime (Kafka -> batcher -> ONNX encoder -> Milvus + tags -> commit).

Never imports torch: the worker image runs ONNX Runtime only.
"""

__version__ = "0.1.0"
