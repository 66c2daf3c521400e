"""A stand-in for mmcv with only what the official AllSpark code imports (``mmcv.cnn.ConvModule``)."""
