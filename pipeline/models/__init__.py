"""Models: the Ouro-compatible LoopLM (teacher) and MELT (student), with their caches."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import LoopLMCache
from .exits import exit_entropy, exit_probabilities, q_exit_loop
from .looplm import LoopLMConfig, LoopLMForCausalLM, LoopLMModel, LoopLMOutput

AutoConfig.register(LoopLMConfig.model_type, LoopLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopLMConfig, LoopLMForCausalLM, exist_ok=True)

__all__ = [
    "LoopLMCache", "LoopLMConfig", "LoopLMForCausalLM", "LoopLMModel", "LoopLMOutput",
    "exit_entropy", "exit_probabilities", "q_exit_loop",
]
