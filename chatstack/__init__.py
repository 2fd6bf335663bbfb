"""chatstack: a from-scratch ChatGPT stack in plain PyTorch (see README.md)."""

__version__ = "0.1.0"
