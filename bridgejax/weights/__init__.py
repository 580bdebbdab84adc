"""Hugging Face / GGUF / converted checkpoints -> frozen Flax parameter trees.

    vision = load_vision_tower(path)        # CLIP or SigLIP vision tower: HF or converted dir
    lm = load_language_model(path)          # Gemma 1/2/3: HF dir, .gguf file or converted dir;
                                            # LLaMA 2/3, Mistral, Qwen2, GPT-Neo: HF or converted dir
    tok = load_tokenizer(path)              # HF tokenizer dir or .gguf vocabulary, with [RET]
"""

from bridgejax.weights.bound import LanguageModel, VisionTower
from bridgejax.weights.errors import CheckpointError, MissingCheckpointError
from bridgejax.weights.language import load_language_model
from bridgejax.weights.tokenizer import Tokenizer, load_tokenizer
from bridgejax.weights.vision import load_vision_tower

__all__ = ["load_vision_tower", "load_language_model", "load_tokenizer", "Tokenizer", "CheckpointError",
           "MissingCheckpointError", "LanguageModel", "VisionTower"]
