"""Weight files: safetensors and PyTorch .bin readers behind one read-only TensorStore (see store.py)."""
from tinyvlm.weights.store import TensorStore, is_ignorable_buffer, open_checkpoint, open_file

__all__ = ["TensorStore", "open_checkpoint", "open_file", "is_ignorable_buffer"]
