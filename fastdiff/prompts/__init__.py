"""Text prompts -> text conditioning, through the tokenizers and text encoders of a diffusers pipeline folder."""

from .encoder import PromptEncoder, find_prompt_encoder, missing_parts, prompt_family, prompt_list

__all__ = ["PromptEncoder", "find_prompt_encoder", "missing_parts", "prompt_family", "prompt_list"]
