"""MELT: a looped transformer with one gated KV slot per token per layer (docs/melt.md, section 2).

At loop 1 a token's slot is its new key/value; at loop t > 1 it becomes
`g * slot + (1 - g) * new` with a learned gate g. The sequence runs in chunks: a query
sees the final slots of earlier chunks and the current slots of its own chunk. With
interpolation alpha, the key/value used for token j is `(1 - alpha) * k_j(t) + alpha * slot_j`;
alpha = 0 is exactly the LoopLM, alpha = 1 is pure MELT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin

from .cache import MeltCache
from .layers import DecoderLayer, causal_padding_mask
from .looplm import (
    BackboneMixin,
    LoopedCausalLMMixin,
    LoopedPreTrainedModel,
    LoopLMBaseOutput,
    LoopLMConfig,
    LoopLMForCausalLM,
    LoopLMOutput,
)
from .prefix_attention import PrefixSpec, prefix_attention

GATE_VARIANTS = ("elementwise", "headwise", "overwrite", "mean")


class MeltConfig(LoopLMConfig):
    """The LoopLM's configuration plus the slot gate, chunking and interpolation."""

    model_type = "melt"

    def __init__(
        self,
        gate: str = "elementwise",
        gate_init_bias: float = -4.0,
        chunk_size: int = 64,
        prompt_chunk_size: Optional[int] = None,
        chunk_sizes: Optional[list] = None,
        alpha: float = 1.0,
        truncate_chunk_gradients: bool = False,
        **kwargs,
    ):
        self.gate = gate
        self.gate_init_bias = gate_init_bias
        self.chunk_size = chunk_size
        self.prompt_chunk_size = prompt_chunk_size
        # explicit chunk lengths for fixed-length rows, used whenever they cover the whole input from
        # position 0 (e.g. [9, 1, 1, 1]: a 9-token prompt as one chunk, then the answer token by token,
        # exactly as prefill + decoding see it)
        self.chunk_sizes = list(chunk_sizes) if chunk_sizes is not None else None
        self.alpha = alpha
        self.truncate_chunk_gradients = truncate_chunk_gradients
        super().__init__(**kwargs)

    def validate_architecture(self) -> None:
        super().validate_architecture()
        if self.gate not in GATE_VARIANTS:
            raise ValueError(f"MeltConfig.gate={self.gate!r} is not one of {GATE_VARIANTS}")
        validate_chunk_size(self.chunk_size, "chunk_size")
        if self.prompt_chunk_size is not None:
            validate_chunk_size(self.prompt_chunk_size, "prompt_chunk_size")
        for size in self.chunk_sizes or []:
            validate_chunk_size(size, "chunk_sizes entries")
        validate_alpha(self.alpha)

    @classmethod
    def from_looplm_config(cls, looplm_config: LoopLMConfig, **options) -> "MeltConfig":
        """The LoopLM's architecture with MELT's options (gate, chunk_size, alpha, ... or overrides)."""
        base = looplm_config.to_dict()
        for key in (
            "model_type",
            "architectures",
            "auto_map",
            "transformers_version",
            "_name_or_path",
            "dtype",
            "torch_dtype",
        ):
            base.pop(key, None)
        base.update(options)
        return cls(**base)


GATE_PARAMETER_MARKER = ".kv_gate."  # every gate parameter's name contains it


def is_gate_parameter(name: str) -> bool:
    return GATE_PARAMETER_MARKER in name


def validate_chunk_size(value, name: str = "chunk_size") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MELT {name} must be an integer >= 1, got {value!r}")


def validate_alpha(value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"MELT alpha must be a number in [0, 1], got {value!r}")


class KVGate(nn.Module):
    """g for the key slot and the value slot of one layer, from the layer's normalised input."""

    def __init__(self, config: MeltConfig):
        super().__init__()
        self.variant = config.gate
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        width = {"elementwise": self.num_kv_heads * self.head_dim, "headwise": self.num_kv_heads}.get(self.variant)
        self.proj = nn.Linear(config.hidden_size, 2 * width) if width else None  # keys and values, fused
        self.init_bias = config.gate_init_bias

    def reset_parameters(self) -> None:
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
            nn.init.constant_(self.proj.bias, self.init_bias)

    def forward(self, x: torch.Tensor, loop: int):
        """x: [B, C, H]; loop (0-based, >= 1) -> g for keys and values, a float or a tensor
        broadcastable to [2, B, kv_heads, C, D] (index 0: keys, 1: values)."""
        if self.variant == "overwrite":
            return 0.0
        if self.variant == "mean":
            return loop / (loop + 1.0)  # running average of the loops so far
        assert self.proj is not None  # elementwise and headwise gates have their projection
        bsz, seq, _ = x.shape
        per_head = self.head_dim if self.variant == "elementwise" else 1
        return torch.sigmoid(self.proj(x)).view(bsz, seq, 2, self.num_kv_heads, per_head).permute(2, 0, 3, 1, 4)


class MeltDecoderLayer(DecoderLayer):
    def __init__(self, config: MeltConfig):
        super().__init__(config)
        self.kv_gate = KVGate(config)


@dataclass
class MeltBaseOutput(LoopLMBaseOutput):
    """The backbone's outputs: a ModelOutput (a dict), which DeepSpeed ZeRO-3's module hooks walk
    (a plain dataclass made it warn "unknown inputs or outputs type" and skip the tensors inside)."""

    gate_stats: Optional[torch.Tensor] = None
    exit_loop: Optional[torch.Tensor] = None


@dataclass
class MeltOutput(LoopLMOutput):
    gate_stats: Optional[torch.Tensor] = None  # [num_layers, 3]: mean, min, max of the gates in this forward
    # (in train mode, or with output_gate_stats=True)


class GateStats:
    """Mean/min/max of gate values per layer over one forward, kept as tensors (no host sync)."""

    def __init__(self, num_layers: int):
        self.parts: list[list] = [[] for _ in range(num_layers)]

    def add(self, layer: int, *gates) -> None:
        for g in gates:
            g = torch.as_tensor(g).detach().float()
            self.parts[layer].append((g.sum(), g.amin(), g.amax(), g.numel()))

    def tensor(self) -> Optional[torch.Tensor]:
        if not any(self.parts):
            return None
        rows = []
        for parts in self.parts:
            if not parts:
                rows.append(torch.full((3,), float("nan")))
                continue
            total = torch.stack([p[0] for p in parts]).sum() / sum(p[3] for p in parts)
            rows.append(
                torch.stack(
                    [
                        total.cpu(),
                        torch.stack([p[1] for p in parts]).min().cpu(),
                        torch.stack([p[2] for p in parts]).max().cpu(),
                    ]
                )
            )
        return torch.stack(rows)


class MeltPreTrainedModel(LoopedPreTrainedModel):
    config_class = MeltConfig  # type: ignore[assignment]  # transformers declares PreTrainedModel.config_class None

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, KVGate):
            module.reset_parameters()


def mix(own: torch.Tensor, slot: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * own + alpha * slot, without arithmetic at the two ends (exactness at alpha 0 and 1)."""
    if alpha == 0.0:
        return own
    if alpha == 1.0:
        return slot
    return torch.lerp(own, slot, alpha)


class MeltModel(BackboneMixin, MeltPreTrainedModel):
    def __init__(self, config: MeltConfig):
        super().__init__(config)
        self.build_backbone(config, MeltDecoderLayer)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[MeltCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        cache_position: Optional[torch.LongTensor] = None,
        chunk_size: Optional[int | Sequence[int]] = None,
        exit_at_loop: Optional[int] = None,
        exit_threshold: Optional[float] = None,
        output_attention_outputs: bool = False,
        keep_loop_states: bool = True,
        output_gate_stats: bool = False,
        layer_inputs: Optional[Sequence[Sequence[torch.Tensor]]] = None,
        decode_from: Optional[int] = None,
        **kwargs,
    ) -> MeltBaseOutput:
        """layer_inputs (teacher forcing): [loop][layer] -> [B, S, H], the hidden state each layer gets
        at each loop instead of the previous layer's output (e.g. a LoopLM teacher's layer inputs).
        decode_from: the chunking of prefill + decoding (see `_chunk_sizes`)."""
        cfg = self.config
        alpha = float(cfg.alpha)
        validate_alpha(alpha)
        num_loops = cfg.total_ut_steps if exit_at_loop is None else exit_at_loop
        if not 1 <= num_loops <= cfg.total_ut_steps:
            raise ValueError(f"exit_at_loop must be in 1..{cfg.total_ut_steps} (1-based), got {exit_at_loop}")
        use_cache = cfg.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if cache is not None and not isinstance(cache, MeltCache):
            raise TypeError(f"past_key_values must be a MeltCache, got {type(cache).__name__}")
        if cache is None:
            # a cache always carries the earlier chunks; it is returned only when asked for
            cache = MeltCache(cfg.num_hidden_layers, cfg.total_ut_steps, keep_loop_kv=alpha < 1.0)
        cache.check_alpha(alpha)
        inputs = self.begin_forward(
            input_ids, inputs_embeds, attention_mask, position_ids, cache_position, cache.get_seq_length()
        )
        hidden, past, positions, cos, sin, padded = (
            inputs.hidden,
            inputs.past,
            inputs.cache_position,
            inputs.cos,
            inputs.sin,
            inputs.padded,
        )
        bsz, seq = hidden.shape[:2]
        if layer_inputs is not None:
            shapes = [[tuple(x.shape) for x in loop] for loop in layer_inputs]
            if len(shapes) < num_loops or any(
                s != [tuple(hidden.shape)] * cfg.num_hidden_layers for s in shapes[:num_loops]
            ):
                raise ValueError(
                    f"layer_inputs must hold {num_loops} loops x {cfg.num_hidden_layers} layers of "
                    f"{list(hidden.shape)} tensors, got shapes {shapes}"
                )

        bounds = self._chunk_bounds(seq, past, chunk_size, decode_from)
        self._reserve(cache, hidden, past + seq)
        stats = GateStats(cfg.num_hidden_layers) if self.training or output_gate_stats else None
        states: list[list[Optional[torch.Tensor]]] = [[] for _ in range(num_loops)]
        gates: list[list[torch.Tensor]] = [[] for _ in range(num_loops)]
        attn: list[list[tuple[torch.Tensor, ...]]] = []
        exit_loops: list[Optional[torch.Tensor]] = []
        padding = attention_mask if padded else None
        for start, end in bounds:
            prefix = past + start
            query_pos = positions[start:end]
            mask = None
            if padded or (prefix > 0 and end - start > 1):
                mask = causal_padding_mask(
                    padding[:, : prefix + end - start] if padding is not None else None, query_pos, prefix + end - start
                )
            forced = (
                None if layer_inputs is None else [[x[:, start:end] for x in layer_inputs[t]] for t in range(num_loops)]
            )
            # the prefix length, not the cache's current one, is passed, so that a checkpointed replay
            # (after later chunks were stored) reads the same prefix
            args = (
                hidden[:, start:end],
                cos[:, start:end],
                sin[:, start:end],
                mask,
                cache,
                prefix,
                num_loops,
                alpha,
                exit_threshold,
                output_attention_outputs,
                keep_loop_states,
                stats,
                forced,
            )
            if self.gradient_checkpointing and self.training:
                out = checkpoint(self._run_chunk, *args, use_reentrant=False)
            else:
                out = self._run_chunk(*args)
            chunk_states, chunk_gates, new_slots, new_loop_kv, chunk_attn, chunk_exit = out
            self._store_chunk(cache, new_slots, new_loop_kv)
            for t in range(num_loops):
                states[t].append(chunk_states[t])
                gates[t].append(chunk_gates[t])
            attn.append(chunk_attn)
            exit_loops.append(chunk_exit)

        cat = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # noqa: E731
        attention_outputs = None
        if output_attention_outputs:
            attention_outputs = tuple(
                tuple(cat([a[t][layer] for a in attn]) for layer in range(cfg.num_hidden_layers))
                for t in range(num_loops)
            )
        return MeltBaseOutput(
            loop_states=tuple(None if s[0] is None else cat(s) for s in states),
            exit_logits=tuple(cat(g) for g in gates),
            past_key_values=cache if use_cache else None,
            attention_outputs=attention_outputs,
            gate_stats=stats.tensor() if stats is not None else None,
            exit_loop=cat(exit_loops) if exit_threshold is not None else None,
        )

    def _chunk_bounds(
        self, seq: int, past: int, chunk_size, decode_from: Optional[int] = None
    ) -> list[tuple[int, int]]:
        bounds, start = [], 0
        for s in self._chunk_sizes(seq, past, chunk_size, decode_from):
            bounds.append((start, start + s))
            start += s
        return bounds

    def _chunk_sizes(self, seq: int, past: int, chunk_size, decode_from: Optional[int] = None) -> list[int]:
        """Chunk lengths for `seq` new tokens after `past` stored ones.

        decode_from (a position counted from the start of the sequence, cache included): the tokens
        before it are chunked as one prefill call of them would chunk them, every later token is a
        chunk of its own, as cached decoding runs it. A forward over prompt + answer with
        decode_from = len(prompt) thus gives the logits that prefill + token-by-token decoding give.
        """
        if decode_from is not None:
            if chunk_size is not None:
                raise ValueError("pass at most one of chunk_size and decode_from")
            if isinstance(decode_from, bool) or not isinstance(decode_from, int) or decode_from < 0:
                raise ValueError(f"decode_from must be an integer >= 0, got {decode_from!r}")
            prompt = min(max(decode_from - past, 0), seq)
            return (self._chunk_sizes(prompt, past, None) if prompt else []) + [1] * (seq - prompt)
        cfg = self.config
        if chunk_size is None and past == 0 and cfg.chunk_sizes and sum(cfg.chunk_sizes) == seq:
            chunk_size = cfg.chunk_sizes
        if chunk_size is None:
            if seq == 1:
                chunk_size = 1
            elif past == 0 and not self.training and cfg.prompt_chunk_size is not None:
                chunk_size = cfg.prompt_chunk_size
            else:
                chunk_size = cfg.chunk_size
        if isinstance(chunk_size, int):
            # Chunks end at the end of the input (the first one takes the remainder): left padding
            # then never moves a chunk boundary, so a padded batch runs exactly as each prompt alone.
            validate_chunk_size(chunk_size)
            return ([seq % chunk_size] if seq % chunk_size else []) + [chunk_size] * (seq // chunk_size)
        sizes = list(chunk_size)
        for s in sizes:
            validate_chunk_size(s, "chunk sizes")
        if sum(sizes) != seq:
            raise ValueError(f"chunk sizes {sizes} sum to {sum(sizes)}, not the sequence length {seq}")
        return sizes

    def _reserve(self, cache: MeltCache, hidden: torch.Tensor, total: int) -> None:
        """Room for the whole input in every cache entry, before the first chunk writes."""
        cfg = self.config
        like = hidden.new_empty(2, hidden.shape[0], cfg.num_key_value_heads, 0, cfg.head_dim)
        for layer in cache.entries:
            layer.reserve(like, total)

    def _store_chunk(self, cache: MeltCache, new_slots: list, new_loop_kv: dict) -> None:
        keep_graph = not self.config.truncate_chunk_gradients
        for entry, kv in enumerate(new_slots):
            cache.entries[entry].write(kv, keep_graph)
        for entry, kv in new_loop_kv.items():
            if cache.entries[entry].get_seq_length() != cache.entries[0].get_seq_length() - kv.shape[3]:
                raise ValueError(
                    f"MELT cache entry {entry} (per-loop keys) holds {cache.entries[entry].length} "
                    f"tokens, the slots {cache.entries[0].length - kv.shape[3]}: the cache's per-loop "
                    "entries are out of step with its slots (was it changed outside the model?)"
                )
            cache.entries[entry].write(kv, keep_graph)

    def _run_chunk(
        self,
        hidden,
        cos,
        sin,
        mask,
        cache: MeltCache,
        prefix: int,
        num_loops: int,
        alpha: float,
        exit_threshold: Optional[float],
        keep_attn: bool,
        keep_states: bool,
        stats: Optional[GateStats],
        forced: Optional[list] = None,
    ):
        """All loops of one chunk after `prefix` stored tokens. Pure (it reads the cache's first `prefix`
        tokens and writes nothing lasting), so that activation checkpointing can replay it; the caller
        stores the chunk's final slots (and per-loop keys) afterwards."""
        cfg = self.config
        num_layers = cfg.num_hidden_layers
        is_causal = mask is None and hidden.shape[1] > 1
        slots: list = [None] * num_layers
        owns: list = [None] * num_layers  # each layer's current own keys/values (for exited tokens)
        new_loop_kv = {}
        bsz, chunk = hidden.shape[:2]
        frozen = torch.zeros(bsz, chunk, dtype=torch.bool, device=hidden.device) if exit_threshold is not None else None
        survive = torch.ones(bsz, chunk, device=hidden.device) if frozen is not None else None
        exit_loop = torch.full((bsz, chunk), num_loops, device=hidden.device) if frozen is not None else None
        states, gates, attn = [], [], []
        state: Optional[torch.Tensor] = None
        for loop in range(num_loops):
            loop_attn = []
            last_loop = loop == num_loops - 1
            for index, layer in enumerate(self.layers):

                def attend(x, q, k, v, layer=layer, index=index):
                    new = torch.stack([k, v])  # keys and values travel together: [2, B, kv_heads, C, D]
                    if loop == 0:
                        slot = new
                    else:
                        g = layer.kv_gate(x, loop)
                        if stats is not None:
                            stats.add(index, g)
                        if frozen is not None:
                            # an exited token keeps its own keys/values at its exit loop too: while
                            # alpha < 1 they are what others read for it at the deeper loops
                            new = torch.where(frozen[None, :, None, :, None], owns[index], new)
                        slot = torch.lerp(new, slots[index], g)
                        if frozen is not None:  # an exited token keeps its slot at its exit-loop state
                            slot = torch.where(frozen[None, :, None, :, None], slots[index], slot)
                    slots[index], owns[index] = slot, new
                    if cache.keep_loop_kv:  # every loop of every token, so that the entries stay in step
                        new_loop_kv[cache.loop_entry(loop, index)] = new
                    # what earlier chunks offer at this loop: their final slots, or while alpha < 1 the
                    # stored mixes of their loop-t keys with those slots
                    read = cache.loop_entry(loop, index) if alpha < 1.0 else index
                    spec = PrefixSpec(
                        cache.entries[read],
                        prefix,
                        mask,
                        is_causal,
                        layer.self_attn.num_kv_heads != layer.self_attn.num_heads,
                    )
                    out = prefix_attention(q, mix(new, slot, alpha), spec)
                    return out.transpose(1, 2).reshape(bsz, chunk, -1)

                if forced is not None:  # teacher forcing: this layer's input is given
                    hidden = forced[loop][index]
                hidden, attn_out = layer(hidden, cos, sin, attend)
                if keep_attn:
                    loop_attn.append(attn_out)
            hidden = self.norm(hidden)
            gate = self.early_exit_gate(hidden).squeeze(-1)
            if frozen is not None:
                assert survive is not None and exit_loop is not None and exit_threshold is not None  # set with frozen
                state = hidden if state is None else torch.where(frozen[..., None], state, hidden)  # None: loop 0
                survive = survive * (1.0 - torch.sigmoid(gate.float()))
                exiting = ~frozen & (1.0 - survive >= exit_threshold) if not last_loop else ~frozen
                exit_loop = torch.where(exiting, loop + 1, exit_loop)
                frozen = frozen | exiting
            else:
                state = hidden
            states.append(state if keep_states or last_loop else None)  # memory: generation keeps the last
            gates.append(gate)
            attn.append(tuple(loop_attn))
        if cache.keep_loop_kv:
            # exit_at_loop: every token stops at the last loop run and, as an exited token does, keeps
            # its keys/values there for the loops not run, which later full-depth steps read
            for loop in range(num_loops, cache.num_loops):
                for index in range(num_layers):
                    new_loop_kv[cache.loop_entry(loop, index)] = owns[index]
            # stored as later chunks read them: mixed with the token's final slot (MeltCache)
            for entry in new_loop_kv:
                new_loop_kv[entry] = mix(new_loop_kv[entry], slots[(entry - num_layers) % num_layers], alpha)
        return states, gates, slots, new_loop_kv, attn, exit_loop


# transformers' PreTrainedModel and GenerationMixin declare generation_config differently (the ignore)
class MeltForCausalLM(LoopedCausalLMMixin, MeltPreTrainedModel, GenerationMixin):  # type: ignore[misc]
    _tied_weights_keys = ["lm_head.weight"]  # type: ignore[assignment]  # transformers declares it None

    def __init__(self, config: MeltConfig):
        super().__init__(config)
        self.build_head(MeltModel(config))
        self.post_init()

    @property
    def alpha(self) -> float:
        return float(self.config.alpha)

    def set_alpha(self, alpha: float) -> None:
        """Interpolation towards the LoopLM (0) or pure MELT (1); the trainer sets it every step."""
        validate_alpha(alpha)
        self.config.alpha = float(alpha)

    @classmethod
    def from_looplm(
        cls,
        looplm: LoopLMForCausalLM | str | Path,
        gate: str = "elementwise",
        chunk_size: int = 64,
        alpha: float = 1.0,
        **options,
    ) -> "MeltForCausalLM":
        """A MELT model with the LoopLM's weights (by name) and fresh gates.

        looplm: a LoopLMForCausalLM or the path of an Ouro/LoopLM checkpoint. options: any other
        MeltConfig field (gate_init_bias, prompt_chunk_size, truncate_chunk_gradients, ...)
        or LoopLM config override (total_ut_steps, ...).
        """
        teacher: LoopLMForCausalLM = (
            looplm if isinstance(looplm, LoopLMForCausalLM) else LoopLMForCausalLM.from_pretrained(looplm)
        )
        config = MeltConfig.from_looplm_config(teacher.config, gate=gate, chunk_size=chunk_size, alpha=alpha, **options)
        param = next(teacher.parameters())
        # PreTrainedModel.to is functools.wraps(nn.Module.to): its stub type wants self once more
        melt = cls(config).to(dtype=param.dtype, device=param.device)  # type: ignore[call-arg]
        missing, unexpected = melt.load_state_dict(teacher.state_dict(), strict=False)
        bad_missing = [k for k in missing if not is_gate_parameter(k)]
        if bad_missing or unexpected:
            raise ValueError(f"LoopLM weights do not map onto MELT: missing {bad_missing}, unexpected {unexpected}")
        return melt.train(teacher.training)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[MeltCache] = None,
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
        chunk_size: Optional[int | Sequence[int]] = None,
        output_gate_stats: bool = False,
        layer_inputs: Optional[Sequence[Sequence[torch.Tensor]]] = None,
        decode_from: Optional[int] = None,
        **kwargs,
    ) -> MeltOutput:
        """As LoopLMForCausalLM.forward, chunk-wise. exit_at_loop runs only that many loops;
        exit_threshold (Q-exit) freezes each token, its keys/values and its slot, at its exit loop;
        layer_inputs ([loop][layer] -> [B, S, H]) forces every layer's input (teacher forcing,
        MeltModel.forward). decode_from=len(prompt) chunks prompt + answer as prefill + cached decoding
        do (the prompt as prefill chunks it, then one chunk per answer token): teacher-forced scores of
        answers equal to the decoder's own."""
        base = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
            chunk_size=chunk_size,
            exit_at_loop=exit_at_loop,
            exit_threshold=exit_threshold,
            output_attention_outputs=output_attention_outputs,
            keep_loop_states=output_loop_logits or expected_logits,
            output_gate_stats=output_gate_stats,
            layer_inputs=layer_inputs,
            decode_from=decode_from,
        )
        out = self.causal_lm_output(
            base, labels, logits_to_keep, output_loop_logits, None, None, expected_logits, MeltOutput
        )
        if exit_threshold is not None:  # states are frozen at each token's exit: the last state is the exit's
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            out.exit_loop = base.exit_loop[:, keep]
        out.gate_stats = base.gate_stats
        return out

    def generate(self, inputs: Optional[torch.Tensor] = None, *args, **kwargs):
        """GenerationMixin.generate, with every forward chunked as cached decoding chunks: without a
        cache (use_cache=False) each step runs prompt + generated tokens in one forward, which would
        otherwise re-chunk the generated tokens with the prompt's chunk size (other logits than the
        cached decoder's). decode_from = the prompt's length gives each generated token its own chunk."""
        if "decode_from" not in kwargs and "chunk_size" not in kwargs:
            prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            if prompt is not None:
                kwargs["decode_from"] = prompt.shape[1]
        return super().generate(inputs, *args, **kwargs)
