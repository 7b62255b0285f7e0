"""Per-step metrics: accumulated over micro-steps, reduced over ranks, written by rank 0 to
TensorBoard (<run_dir>/tensorboard), a JSONL file (<run_dir>/metrics.jsonl) and the console."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from pipeline.training import comm
from pipeline.training.checkpointing import write_durable

log = logging.getLogger("melt.train")


class StepMetrics:
    """Sums what one rank saw during a step; `reduce()` (collective) gives the global values.

    Loss metrics are per-token means, combined weighted by each micro-batch's token count;
    other statistics carry their own reduction ("mean", "min" or "max").
    """

    def __init__(self) -> None:
        self.loss = 0.0
        self.tokens = 0
        self.weighted: dict[str, float] = {}  # per metric: sum of mean x its tokens, and the tokens
        self.weights: dict[str, int] = {}
        self.stats: dict[str, tuple[list[float], str]] = {}

    def add(self, out) -> None:
        n = int(out.losses.num_tokens)
        self.loss += float(out.losses.total.detach())
        self.tokens += n
        for name, value in out.losses.metrics.items():
            weight = int(out.losses.metric_tokens.get(name, n))
            self.weighted[name] = self.weighted.get(name, 0.0) + float(value) * weight
            self.weights[name] = self.weights.get(name, 0) + weight
        for name, (value, op) in out.stats.items():
            self.stats.setdefault(name, ([], op))[0].append(float(value))

    def reduce(self) -> dict[str, float]:
        weighted = sorted(self.weighted)
        means = sorted(k for k, (_, op) in self.stats.items() if op == "mean")
        mins = sorted(k for k, (_, op) in self.stats.items() if op == "min")
        maxs = sorted(k for k, (_, op) in self.stats.items() if op == "max")
        sums = torch.tensor(
            [self.loss, float(self.tokens)]
            + [self.weighted[k] for k in weighted]
            + [float(self.weights[k]) for k in weighted]
            + [sum(self.stats[k][0]) for k in means]
            + [float(len(self.stats[k][0])) for k in means],
            dtype=torch.float64,
        )
        comm.all_reduce(sums)
        low = comm.all_reduce(torch.tensor([min(self.stats[k][0]) for k in mins] or [0.0], dtype=torch.float64), "min")
        high = comm.all_reduce(torch.tensor([max(self.stats[k][0]) for k in maxs] or [0.0], dtype=torch.float64), "max")
        out = {"train/loss": sums[0].item(), "train/tokens": sums[1].item()}
        for i, k in enumerate(weighted):
            out[f"train/{k}"] = sums[2 + i].item() / max(sums[2 + len(weighted) + i].item(), 1.0)
        base = 2 + 2 * len(weighted)
        for i, k in enumerate(means):
            out[k] = sums[base + i].item() / max(sums[base + len(means) + i].item(), 1.0)
        out.update({k: low[i].item() for i, k in enumerate(mins)})
        out.update({k: high[i].item() for i, k in enumerate(maxs)})
        return out


def read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill: everything after it is gone too
    return records


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLogger:
    """Rank 0 writes; on other ranks every method is a no-op."""

    def __init__(
        self, run_dir: Path, rank: int, phase: str, total_steps: int, start_step: int, tensorboard: bool = True
    ):
        self.enabled = rank == 0
        self.phase, self.total_steps = phase, total_steps
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        # drop records of steps a killed run made after its last checkpoint: they are redone
        kept = [r for r in read_jsonl(self.jsonl) if r.get("step", 0) <= start_step]
        write_durable(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self._file = open(self.jsonl, "a")

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, "```\n" + text + "\n```", 0)
            self.writer.flush()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()

    def console(self, step: int, scalars: dict[str, float], eta_s: float) -> None:
        if not self.enabled:
            return
        lrs = " ".join(f"{k[3:]}={v:.2e}" for k, v in scalars.items() if k.startswith("lr/"))
        extra = f" alpha {scalars['train/alpha']:.3f}" if "train/alpha" in scalars else ""
        extra += "".join(f" {k} {scalars[f'train/{k}']:.4f}" for k in ("align", "kl") if f"train/{k}" in scalars)
        log.info(
            f"[{self.phase}] step {step}/{self.total_steps} loss {scalars['train/loss']:.4f} lr {lrs}"
            f"{extra} grad_norm {scalars.get('train/grad_norm', float('nan')):.3f} "
            f"tok/s {scalars.get('perf/tokens_per_s', 0):,.0f} eta {format_duration(eta_s)}"
        )

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            self._file.close()
            if self.writer is not None:
                self.writer.close()


def setup_console_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if rank != 0:
        log.setLevel(logging.WARNING)


def summarize_partition(stats: list[dict]) -> Optional[str]:
    if not stats:
        return None
    return "\n".join(
        f"rank {s['rank']}: {s['local_numel']:,} of {s['total_numel']:,} parameters "
        f"({s['local_numel'] / max(s['total_numel'], 1):.1%}), params {s['param_bytes']:,} B, "
        f"master {s['master_bytes']:,} B, optimizer {s['optimizer_state_bytes']:,} B"
        for s in stats
    )
