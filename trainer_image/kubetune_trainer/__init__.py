"""kubetune trainer: preemption-safe, exactly resumable fine-tuning of timm models (runs inside each pod)."""

__version__ = "0.1.0"
