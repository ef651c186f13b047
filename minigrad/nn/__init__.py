"""Neural-network building blocks."""
from .lowrank import LowRankLinear, factorize_
from .lora import LoRALinear, apply_lora, mark_only_lora_as_trainable
from .layers import GELU, Dropout, Embedding, LayerNorm, Linear, ModuleList, ReLU, Sequential, Tanh
from .module import Module, Parameter, StateDictError
from .reversible import ReversibleBlock, ReversibleSequence, reversible_sequence


def count_parameters(module: Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (each shared parameter counted once)."""
    return module.num_parameters(trainable_only)
