"""apexctl: APEX one-step distillation for text-to-image flow models."""

__version__ = "0.1.0"
