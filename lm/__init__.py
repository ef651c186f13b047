"""lm: a GPT language model written on minigrad, with its tokenizers, data, training and decoding."""
__version__ = "0.1.0"
