"""Train one phase.

    deepspeed pipeline/train.py --config configs/smoke/pretrain.yaml [dotted.key=value ...]
    deepspeed pipeline/train.py --config configs/ouro/1.4b.yaml --phase transition
    torchrun --nproc_per_node 2 pipeline/train.py --config configs/smoke/pretrain.yaml engine.name=fsdp

Rerunning the same command resumes from the run's latest complete checkpoint.
Exit codes: 0 done (or stopped at schedule.stop_at_step), 2 refused (configuration,
data, checkpoint mismatch), 3 non-finite loss, 4 another rank was lost (a collective failed or
waited longer than engine.collective_timeout_s): rerun or requeue, it resumes.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not sibling modules
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train one phase of the MELT pipeline (DeepSpeed ZeRO-3, or FSDP2 with engine.name=fsdp)."
    )
    parser.add_argument("--config", required=True, help="run config YAML, or an experiment YAML with --phase")
    parser.add_argument("--phase", default=None, help="which section of an experiment file to run")
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher (LOCAL_RANK is read from the environment)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_intermixed_args(argv)


EXIT_LOST_PEER = 4  # launchers/job.py requeues the SLURM job on it

# what gloo and NCCL say when a peer is gone or does not answer within the process group's timeout
LOST_PEER = (
    "Timed out waiting",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Watchdog caught collective operation timeout",
    "NCCL communicator was aborted",
)


def lost_peer(err: BaseException) -> bool:
    import torch.distributed

    return isinstance(err, torch.distributed.DistBackendError) or any(m in str(err) for m in LOST_PEER)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.data import DataResumeError
    from pipeline.distributed import resolve_distributed_env
    from pipeline.training.config import ConfigError, load_run_config
    from pipeline.training.trainer import NonFiniteLoss, run

    try:
        cfg = load_run_config(args.config, args.overrides, args.phase)
        env = resolve_distributed_env()
        run(cfg, env)
    except (ConfigError, DataResumeError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    except RuntimeError as err:  # a peer died or hung: fail now with a clear error, not hang
        if not lost_peer(err):
            raise
        first = str(err).strip().splitlines()[0]
        print(
            f"error: rank {env.rank}: lost contact with another rank (its process or node is gone, or it did not "
            f"answer within engine.collective_timeout_s={cfg.engine.collective_timeout_s} s): {first}. "
            "Rerun (or let SLURM requeue) to resume from the latest checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_LOST_PEER
    return 0


if __name__ == "__main__":
    sys.exit(main())
