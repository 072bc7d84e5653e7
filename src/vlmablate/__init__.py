"""vlmablate: which parts of a LLaVA-style model should you train, and what does each choice cost?"""

__version__ = "0.1.0"
