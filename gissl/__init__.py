"""gissl: self-supervised learning for gastrointestinal endoscopy, in plain PyTorch."""

__version__ = "0.1.0"
