"""Models: the Ouro-compatible LoopLM (teacher) and MELT (student), with their caches."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import LoopLMCache, MeltCache
from .exits import exit_entropy, exit_probabilities, q_exit_loop
from .looplm import LoopedPreTrainedModel, LoopLMConfig, LoopLMForCausalLM, LoopLMModel, LoopLMOutput
from .melt import GATE_VARIANTS, MeltConfig, MeltForCausalLM, MeltModel, MeltOutput
from .standalone import write_standalone

# here, not in looplm.py: the standalone file generated from looplm.py must not import its generator
LoopedPreTrainedModel.standalone_writer = staticmethod(write_standalone)

AutoConfig.register(LoopLMConfig.model_type, LoopLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopLMConfig, LoopLMForCausalLM, exist_ok=True)
AutoConfig.register(MeltConfig.model_type, MeltConfig, exist_ok=True)
AutoModelForCausalLM.register(MeltConfig, MeltForCausalLM, exist_ok=True)

__all__ = [
    "GATE_VARIANTS",
    "LoopLMCache",
    "LoopLMConfig",
    "LoopLMForCausalLM",
    "LoopLMModel",
    "LoopLMOutput",
    "MeltCache",
    "MeltConfig",
    "MeltForCausalLM",
    "MeltModel",
    "MeltOutput",
    "exit_entropy",
    "exit_probabilities",
    "q_exit_loop",
]
