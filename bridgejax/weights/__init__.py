"""Hugging Face / GGUF / converted checkpoints -> frozen Flax parameter trees.

    vision = load_vision_tower(path)        # CLIP vision tower
"""

from bridgejax.weights.clip import load_vision_tower
from bridgejax.weights.errors import CheckpointError, MissingCheckpointError

__all__ = ["load_vision_tower", "CheckpointError", "MissingCheckpointError"]
