"""gptlab: train GPT-2-family causal language models with a loop you can read."""
__version__ = "0.1.0"
