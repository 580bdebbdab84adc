"""Hugging Face / GGUF / converted checkpoints -> frozen Flax parameter trees.

    vision = load_vision_tower(path)        # CLIP vision tower
    lm = load_language_model(path)          # Gemma 1/2/3: HF dir, .gguf file or converted dir;
                                            # LLaMA 2/3, Mistral, Qwen2: HF or converted dir
    tok = load_tokenizer(path)              # HF tokenizer dir or .gguf vocabulary, with [RET]
"""

from bridgejax.weights.bound import LanguageModel, VisionTower
from bridgejax.weights.clip import load_vision_tower
from bridgejax.weights.errors import CheckpointError, MissingCheckpointError
from bridgejax.weights.language import load_language_model
from bridgejax.weights.tokenizer import Tokenizer, load_tokenizer

__all__ = ["load_vision_tower", "load_language_model", "load_tokenizer", "Tokenizer", "CheckpointError",
           "MissingCheckpointError", "LanguageModel", "VisionTower"]
