"""NoteLLM: prompts (light, imported by the worker too), model, losses, data, training, evaluation.

Importing this package imports nothing heavy; torch is imported only by the modules that need it.
"""

__version__ = "0.1.0"
