"""koala: lossless speculative decoding with KOALA multi-layer draft heads."""
