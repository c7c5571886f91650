"""koala: lossless speculative decoding with KOALA multi-layer draft heads.

    from koala import SpeculativeGenerator
    gen = SpeculativeGenerator.from_pretrained("smollm2-135m-instruct", draft="default")
    print(gen.generate("Why is the sky blue?").text)
"""
from .config import ModelConfig
from .errors import (CheckpointError, ContextLengthError, HeadMismatchError, KoalaError, SamplingError,
                     UnsupportedModelError)
from .generator import GenerationResult, GenerationStats, SpeculativeGenerator
from .loading import DEFAULT_TARGET, load_target
from .sampling import SamplingParams

__all__ = ["SpeculativeGenerator", "GenerationResult", "GenerationStats", "ModelConfig", "SamplingParams",
           "load_target", "DEFAULT_TARGET", "KoalaError", "CheckpointError", "ContextLengthError",
           "HeadMismatchError", "SamplingError", "UnsupportedModelError", "DraftConfig"]


def __getattr__(name):  # the heads module is written alongside; import it lazily
    if name == "DraftConfig":
        from .heads import DraftConfig
        return DraftConfig
    raise AttributeError(name)
