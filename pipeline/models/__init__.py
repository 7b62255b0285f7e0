"""Models: the Ouro-compatible LoopLM (teacher) and MELT (student), with their caches."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import LoopLMCache, MeltCache
from .exits import exit_entropy, exit_probabilities, q_exit_loop
from .looplm import LoopLMConfig, LoopLMForCausalLM, LoopLMModel, LoopLMOutput
from .melt import GATE_VARIANTS, MeltConfig, MeltForCausalLM, MeltModel, MeltOutput

AutoConfig.register(LoopLMConfig.model_type, LoopLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopLMConfig, LoopLMForCausalLM, exist_ok=True)
AutoConfig.register(MeltConfig.model_type, MeltConfig, exist_ok=True)
AutoModelForCausalLM.register(MeltConfig, MeltForCausalLM, exist_ok=True)

__all__ = [
    "GATE_VARIANTS", "LoopLMCache", "LoopLMConfig", "LoopLMForCausalLM", "LoopLMModel", "LoopLMOutput",
    "MeltCache", "MeltConfig", "MeltForCausalLM", "MeltModel", "MeltOutput",
    "exit_entropy", "exit_probabilities", "q_exit_loop",
]
