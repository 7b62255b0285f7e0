"""python -m pipeline.bench {memory,decode,train} --out FILE.json [options]"""

import argparse
import importlib
import json
import sys
from pathlib import Path

from pipeline.bench import BENCHMARKS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    modules = {}
    for name, module_name in BENCHMARKS.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # not written yet
        doc = (modules[name].__doc__ or "").strip().splitlines()
        p = sub.add_parser(
            name,
            help=doc[0] if doc else name,
            description=modules[name].__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--out", type=Path, required=True, help="JSON file to write (a PNG plot goes next to it)")
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = modules[args.benchmark].run(args)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(result.get("summary", {}), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
