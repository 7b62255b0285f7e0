"""One memory measurement in a fresh process (see pipeline.bench.memory). Prints one JSON line."""

import json
import sys
import types

import torch

from pipeline.bench.common import build_contender, current_rss_bytes, device_and_dtype, generate, peak_rss_bytes


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    args = types.SimpleNamespace(device=spec["device"], dtype=spec["dtype"])
    device, dtype = device_and_dtype(args)
    max_positions = spec["context"] + spec["new_tokens"] + 8
    model = build_contender(
        spec["kind"], spec["shape"], spec["loops"], max_positions, spec["seed"], device, dtype, spec["prefill_chunk"]
    )
    generator = torch.Generator().manual_seed(spec["seed"])
    prompt = torch.randint(3, spec["shape"]["vocab"], (spec["batch"], spec["context"]), generator=generator)
    generate(model, prompt[:, :8].to(device), 2)  # warm up kernels and allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
    out = generate(model, prompt.to(device), spec["new_tokens"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    print(
        json.dumps(
            {
                "model": spec["kind"],
                "loops": spec["loops"],
                "context": spec["context"],
                "kv_cache_bytes": out.past_key_values.nbytes,
                "peak_bytes": peak,
                "peak_rise_bytes": max(peak - before, 0),
                "batch": spec["batch"],
                "device": device.type,
                "dtype": str(dtype).replace("torch.", ""),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
