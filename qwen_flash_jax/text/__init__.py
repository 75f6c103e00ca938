"""Text side: the toy tokenizer and text encoder, and Qwen-Image prompt conventions."""
