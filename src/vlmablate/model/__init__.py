"""Models: load or compose an HF Llava / LlavaNext checkpoint, quantize, freeze, add LoRA, account."""
