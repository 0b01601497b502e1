"""The CCT family: one parametrised module, a registry of named variants, checkpoint loading."""

from .cct import CCT, ConvTokenizer, EncoderBlock, SeqPool, sinusoidal_embedding
from .checkpoint import convert_official_state_dict, load_checkpoint, read_state_dict
from .factory import check_model_name, create_model, list_models
from .registry import PAPER_TOP1, VARIANTS

__all__ = [
    "CCT", "ConvTokenizer", "EncoderBlock", "SeqPool", "sinusoidal_embedding", "convert_official_state_dict",
    "load_checkpoint", "read_state_dict", "check_model_name", "create_model", "list_models", "PAPER_TOP1",
    "VARIANTS",
]
