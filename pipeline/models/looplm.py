"""The Ouro-compatible LoopLM (teacher; with total_ut_steps=1, a standard transformer).

Loads Ouro checkpoints as published (model_type "ouro") by parameter name, with no
remote code. Semantics: docs/melt.md, section 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .cache import LoopLMCache
from .checkpoint_io import check_checkpoint_fits
from .exits import exit_probabilities, q_exit_loop, select_by_loop, validate_exit_options
from .layers import DecoderLayer, RMSNorm, RotaryEmbedding, causal_padding_mask

logger = logging.get_logger(__name__)


class LoopLMConfig(PretrainedConfig):
    """Ouro's configuration, key for key (so that Ouro's own code can read what we save)."""

    model_type = "ouro"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1_000_000.0,
        rope_scaling: Optional[dict] = None,
        use_sliding_window: bool = False,
        sliding_window: Optional[int] = None,
        max_window_layers: int = 28,
        layer_types: Optional[list] = None,
        attention_dropout: float = 0.0,
        total_ut_steps: int = 4,
        early_exit_threshold: float = 1.0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.layer_types = layer_types if layer_types is not None else ["full_attention"] * num_hidden_layers
        self.attention_dropout = attention_dropout
        self.total_ut_steps = total_ut_steps
        self.early_exit_threshold = early_exit_threshold
        if bos_token_id == eos_token_id == pad_token_id == 0 and vocab_size > 2:
            # Ouro's shipped config says bos = eos = pad = 0; its ChatML tokenizer has bos 1, eos 2, pad 0.
            logger.warning("config has bos = eos = pad = 0 (an upstream Ouro defect); using bos 1, eos 2, pad 0")
            bos_token_id, eos_token_id = 1, 2
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_architecture()

    def validate_architecture(self) -> None:
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu' is supported)")
        if self.rope_scaling:
            problems.append(f"rope_scaling={self.rope_scaling!r} (not supported)")
        if self.use_sliding_window:
            problems.append("use_sliding_window=True (not supported)")
        if self.total_ut_steps < 1:
            problems.append(f"total_ut_steps={self.total_ut_steps} (must be >= 1)")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if problems:
            raise ValueError(f"{type(self).__name__}: unsupported configuration: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        found = config_dict.get("model_type")
        if found is not None and found != cls.model_type:
            raise ValueError(
                f"{cls.__name__} expects model_type {cls.model_type!r} but the checkpoint's config.json says {found!r}"
            )
        return super().from_dict(config_dict, **kwargs)


@dataclass
class LoopLMBaseOutput(ModelOutput):
    loop_states: Optional[tuple] = None  # normalised state h_t after each loop, [B, S, H] each (None
    # for loops before the last unless keep_loop_states)
    exit_logits: Optional[tuple] = None  # early-exit gate logit after each loop, [B, S] each
    past_key_values: Optional[object] = None
    attention_outputs: Optional[tuple] = None  # [loop][layer] -> [B, S, heads*head_dim], before o_proj


@dataclass
class LoopLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # chosen output (last loop unless an exit option says otherwise)
    loop_logits: Optional[tuple] = None  # lm_head(h_t) for every loop, [B, S, V] each
    exit_logits: Optional[tuple] = None
    exit_probs: Optional[torch.Tensor] = None  # [T, B, S]
    exit_loop: Optional[torch.Tensor] = None  # [B, S], 1-based loop each token's output came from
    past_key_values: Optional[object] = None
    loop_states: Optional[tuple] = None
    attention_outputs: Optional[tuple] = None


class LoopedPreTrainedModel(PreTrainedModel):
    """Weight init and strict loading shared by the LoopLM and MELT."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    # (directory, model_type) -> auto_map: writes the standalone modelling file. Set by pipeline.models
    # (pipeline/models/standalone.py); None in that generated file, which is itself the modelling code.
    standalone_writer: Optional[Callable[[str, str], dict]] = None

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (per-loop for the LoopLM, gated slots for MELT)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Hugging Face loading, made strict: missing, unexpected or mis-shaped tensors are errors."""
        want_info = kwargs.pop("output_loading_info", False)
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path)
            for key, value in kwargs.items():
                if hasattr(config, key):
                    setattr(config, key, value)
        check_checkpoint_fits(cls, config, pretrained_model_name_or_path)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = []
        if info.get("missing_keys"):
            problems.append(f"missing tensors: {sorted(info['missing_keys'])}")
        if info.get("unexpected_keys"):
            problems.append(f"unexpected tensors: {sorted(info['unexpected_keys'])}")
        for mismatch in info.get("mismatched_keys") or []:
            problems.append(
                f"tensor {mismatch[0]} has shape {tuple(mismatch[1])} in the checkpoint, "
                f"{tuple(mismatch[2])} in the model"
            )
        if problems:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} does not fit {cls.__name__}: " + "; ".join(problems)
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, standalone: bool = False, **kwargs):
        """Hugging Face saving; standalone=True also writes the generated modelling file beside the weights
        and names it in config.json's `auto_map`, so that transformers loads the checkpoint with
        trust_remote_code=True where this package is not installed. Without it the config is saved as it
        is (an auto_map it carries, e.g. upstream Ouro's, is kept as before)."""
        if not standalone:
            return super().save_pretrained(save_directory, *args, **kwargs)
        if self.standalone_writer is None:
            raise RuntimeError(
                "save_pretrained(standalone=True) needs the melt-pipeline package, which generates "
                "the modelling file from its source; a model loaded with trust_remote_code saves "
                "its modelling file with plain save_pretrained"
            )
        had_map, auto_map = hasattr(self.config, "auto_map"), getattr(self.config, "auto_map", None)
        os.makedirs(save_directory, exist_ok=True)
        self.config.auto_map = self.standalone_writer(save_directory, self.config.model_type)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:  # the in-memory config is left as it was
            if had_map:
                self.config.auto_map = auto_map
            else:
                del self.config.auto_map


def check_positions(config, past_length: int, seq_length: int) -> None:
    if past_length + seq_length > config.max_position_embeddings:
        raise ValueError(
            f"sequence of {past_length + seq_length} positions (past {past_length} + new {seq_length}) exceeds "
            f"max_position_embeddings={config.max_position_embeddings}"
        )


def default_position_ids(attention_mask, cache_position, seq_length: int) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded sequence sees the positions it would alone."""
    if attention_mask is None:
        return cache_position.unsqueeze(0)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return positions[:, -seq_length:]


class LoopLMPreTrainedModel(LoopedPreTrainedModel):
    config_class = LoopLMConfig  # type: ignore[assignment]  # transformers declares PreTrainedModel.config_class None


class BackboneMixin:
    """Embedding, decoder layers, final norm, RoPE and exit gate: the LoopLM's and MELT's backbone
    (under Ouro's parameter names)."""

    config: Any  # the model's (a LoopLMConfig or MeltConfig), which this is mixed into

    def build_backbone(self, config, layer_cls) -> None:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(layer_cls(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.gradient_checkpointing = False

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def begin_forward(
        self, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past: int
    ) -> "ForwardInputs":
        """What every forward starts with, after `past` cached tokens: the embedded input, its cache
        positions, RoPE and whether the attention mask pads anything."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        seq = hidden.shape[1]
        check_positions(self.config, past, seq)
        if cache_position is None:
            cache_position = torch.arange(past, past + seq, device=hidden.device)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, cache_position, seq)
        cos, sin = self.rotary_emb(hidden, position_ids)
        padded = attention_mask is not None and not bool(attention_mask.all())
        return ForwardInputs(hidden, past, cache_position, cos, sin, padded)


@dataclass
class ForwardInputs:
    hidden: torch.Tensor  # [B, S, H] embedded input
    past: int  # tokens already in the cache
    cache_position: torch.Tensor  # [S] their positions in the cache
    cos: torch.Tensor  # RoPE of the positions (padding excluded), [B, S, D]
    sin: torch.Tensor
    padded: bool  # the attention mask hides some token


class LoopLMModel(BackboneMixin, LoopLMPreTrainedModel):
    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.build_backbone(config, DecoderLayer)
        self.post_init()

    def run_layer(self, layer, hidden, cos, sin, attend):
        if self.gradient_checkpointing and self.training:
            return checkpoint(layer, hidden, cos, sin, attend, use_reentrant=False)
        return layer(hidden, cos, sin, attend)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[LoopLMCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        output_attention_outputs: bool = False,
        keep_loop_states: bool = True,
        **kwargs,
    ) -> LoopLMBaseOutput:
        num_loops, num_layers = self.config.total_ut_steps, self.config.num_hidden_layers
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = LoopLMCache(num_layers, num_loops)
        if past_key_values is not None and not isinstance(past_key_values, LoopLMCache):
            raise TypeError(f"past_key_values must be a LoopLMCache, got {type(past_key_values).__name__}")
        if past_key_values is not None and past_key_values.num_loops != num_loops:
            raise ValueError(f"cache was built for {past_key_values.num_loops} loops, model runs {num_loops}")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs = self.begin_forward(input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past)
        hidden, positions, cos, sin, padded = (
            inputs.hidden,
            inputs.cache_position,
            inputs.cos,
            inputs.sin,
            inputs.padded,
        )
        seq = hidden.shape[1]

        mask = None
        if padded or (past > 0 and seq > 1):  # else plain causal SDPA (or one query seeing every key)
            mask = causal_padding_mask(attention_mask if padded else None, positions, past + seq)
        is_causal = mask is None and seq > 1

        states, gates, attn_outputs = [], [], []
        for loop in range(num_loops):
            loop_attn = []
            for index, layer in enumerate(self.layers):
                attend = self._attend_fn(layer.self_attn, past_key_values, loop, index, mask, is_causal)
                hidden, attn_out = self.run_layer(layer, hidden, cos, sin, attend)
                if output_attention_outputs:
                    loop_attn.append(attn_out)
            hidden = self.norm(hidden)
            states.append(hidden if keep_loop_states or loop == num_loops - 1 else None)  # memory: generation
            gates.append(self.early_exit_gate(hidden).squeeze(-1))
            attn_outputs.append(tuple(loop_attn))
        return LoopLMBaseOutput(
            loop_states=tuple(states),
            exit_logits=tuple(gates),
            past_key_values=past_key_values,
            attention_outputs=tuple(attn_outputs) if output_attention_outputs else None,
        )

    @staticmethod
    def _attend_fn(attn, cache, loop, layer_index, mask, is_causal):
        def attend(x, q, k, v):
            if cache is not None:
                k, v = cache.update(k, v, cache.slot(loop, layer_index))
            return attn.attend(q, k, v, mask, is_causal)

        return attend


class LoopedCausalLMMixin:
    """lm_head on the loop states, exit options and the LM loss, shared by the LoopLM and MELT."""

    config: Any  # the model's (a LoopLMConfig or MeltConfig), which this is mixed into

    def build_head(self, backbone: nn.Module) -> None:
        self.model = backbone
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def causal_lm_output(
        self,
        base,
        labels,
        logits_to_keep,
        output_loop_logits,
        exit_at_loop,
        exit_threshold,
        expected_logits,
        output_cls,
    ):
        num_loops = len(base.exit_logits)
        validate_exit_options(num_loops, exit_at_loop, exit_threshold, expected_logits)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep > 0 else slice(None)
        probs = exit_probabilities([g[:, keep] for g in base.exit_logits])
        need_all = output_loop_logits or exit_threshold is not None or expected_logits
        loop_logits = tuple(self.lm_head(h[:, keep]) for h in base.loop_states) if need_all else None

        exit_loop = None
        if exit_threshold is not None:
            index = q_exit_loop(probs, exit_threshold)
            logits = select_by_loop(torch.stack(loop_logits), index)
            exit_loop = index + 1
        elif expected_logits:
            logits = (probs.unsqueeze(-1).to(loop_logits[0].dtype) * torch.stack(loop_logits)).sum(0)
        else:
            chosen = num_loops if exit_at_loop is None else exit_at_loop
            logits = (
                loop_logits[chosen - 1]
                if loop_logits is not None
                else self.lm_head(base.loop_states[chosen - 1][:, keep])
            )
            exit_loop = torch.full(logits.shape[:2], chosen, device=logits.device)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return output_cls(
            loss=loss,
            logits=logits,
            loop_logits=loop_logits if output_loop_logits else None,
            exit_logits=base.exit_logits,
            exit_probs=probs,
            exit_loop=exit_loop,
            past_key_values=base.past_key_values,
            loop_states=base.loop_states,
            attention_outputs=base.attention_outputs,
        )


# transformers' PreTrainedModel and GenerationMixin declare generation_config differently (the ignore)
class LoopLMForCausalLM(LoopedCausalLMMixin, LoopLMPreTrainedModel, GenerationMixin):  # type: ignore[misc]
    _tied_weights_keys = ["lm_head.weight"]  # type: ignore[assignment]  # transformers declares it None

    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.build_head(LoopLMModel(config))
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[LoopLMCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        output_loop_logits: bool = False,
        output_attention_outputs: bool = False,
        exit_at_loop: Optional[int] = None,
        exit_threshold: Optional[float] = None,
        expected_logits: bool = False,
        **kwargs,
    ) -> LoopLMOutput:
        """Runs total_ut_steps loops. `.logits` is the last loop's unless one exit option is given:
        exit_at_loop (1-based), exit_threshold (Q-exit on the exit CDF, per token) or expected_logits
        (sum_t p_t * logits_t). `labels` gives the plain next-token CE of `.logits`; Ouro's
        stage-I loss is `pipeline.training.losses.ouro_stage1_loss`."""
        base = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
            output_attention_outputs=output_attention_outputs,
            keep_loop_states=output_loop_logits
            or expected_logits
            or exit_threshold is not None
            or exit_at_loop is not None,
        )
        return self.causal_lm_output(
            base,
            labels,
            logits_to_keep,
            output_loop_logits,
            exit_at_loop,
            exit_threshold,
            expected_logits,
            LoopLMOutput,
        )
