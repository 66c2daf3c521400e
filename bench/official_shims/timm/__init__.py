"""A stand-in for timm with only what the official AllSpark code imports (``timm.models.layers``)."""
