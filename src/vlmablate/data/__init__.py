"""Data: LLaVA-format sources, conversation templates and label masking, batching."""
