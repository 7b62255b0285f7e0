"""Standalone exports load where this package is not installed, with transformers alone.

A subprocess runs the venv's python with -S (no site processing: the editable install's hook does
not run) from an empty cwd, with only the venv's site-packages on sys.path, so `import pipeline`
fails there; it loads our exports with trust_remote_code=True and must generate what our package
generates, and lm_eval's own `hf` model must evaluate a MELT export. One transformers version
covers both "pinned" and "newest 4.x": constraints.txt pins 4.57.6, the last 4.x release.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from pipeline.data.padding import leading_pad_mask
from pipeline.evaluation.data import EvalSplit
from pipeline.evaluation.harness import TASK, run_harness, write_task
from pipeline.export_hub import main as export_hub
from pipeline.models import LoopLMForCausalLM, MeltForCausalLM
from pipeline.models.standalone import generate_source
from pipeline.training.export import save_hf
from tests.model_helpers import random_gates, write_eval_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo" / "looplm"
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
INDEX_SHA = "ab" * 32
ALLOWED_IMPORTS = {"torch", "transformers", "safetensors", "__future__"} | set(sys.stdlib_module_names)
# two prompts of different lengths, left-padded (demo vocabulary: 4 '=', 5-7 digits, 8-13 permutations)
IDS = [[0, 0, 8, 11, 9, 6, 4], [10, 12, 13, 8, 9, 5, 4]]
NEW_TOKENS = 4

PACKAGE_FREE = f"""
import json, sys
sys.path.append({SITE_PACKAGES!r})
try:
    import pipeline
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the melt pipeline package is importable: the check would prove nothing")
"""

# one process for both checks (its imports of torch, transformers and lm_eval are most of its time)
PACKAGE_FREE_CHECKS = (
    PACKAGE_FREE
    + """
import torch
from transformers import AutoModelForCausalLM
args = json.loads(sys.argv[1])
ids, mask = torch.tensor(args["ids"]), torch.tensor(args["mask"])
out = {}
for name, path in args["exports"].items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args["new"], do_sample=False,
                            pad_token_id=0, use_cache=True)
    cache_bytes = []
    for loops in range(1, model.config.total_ut_steps + 1):
        looped = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, total_ut_steps=loops).eval()
        with torch.no_grad():
            cache_bytes.append(looped(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values.nbytes)
    out[name] = {"module": type(model).__module__, "tokens": tokens.tolist(), "cache_bytes": cache_bytes}
print("GENERATED " + json.dumps(out), flush=True)

from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + args["lm_eval"]
cli_evaluate()
"""
)


def run_package_free(code: str, args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HOME=str(cwd / "hf_home"),
        HF_MODULES_CACHE=str(cwd / "hf_modules"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A MELT export written by the trainer's save_hf in a run dir, and the demo LoopLM through export_hub."""
    root = tmp_path_factory.mktemp("standalone")
    melt = random_gates(MeltForCausalLM.from_looplm(LoopLMForCausalLM.from_pretrained(DEMO), chunk_size=2)).eval()
    run_dir = root / "distill"
    (run_dir / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "model": {"init_from": str(DEMO)},
                "data": {"path": str(root / "data"), "global_batch_size": 8},
                "phase": {"name": "distill"},
                "schedule": {"total_steps": 10},
                "optimizer": {"lr": 0.001},
                "teacher": {"init_from": str(DEMO)},
            }
        )
    )
    (run_dir / "checkpoints" / "step_00000010" / "trainer_state.json").write_text(
        json.dumps({"step": 10, "fingerprint": {"index_sha256": INDEX_SHA}})
    )
    # the tokenizer source is a model dir: its config.json and weights must not replace the export's
    save_hf(
        MeltForCausalLM,
        melt.config,
        melt.state_dict(),
        run_dir / "export",
        torch.float32,
        tokenizer=str(DEMO),
        info={"step": 10, "phase": "distill", "checkpoint": "step_00000010"},
        run_dir=run_dir,
    )
    assert export_hub([str(DEMO), "--out", str(root / "looplm")]) == 0
    return {"melt": run_dir / "export", "looplm": root / "looplm", "root": root}


def test_exports_hold_code_auto_map_and_card(exports):
    for name, path, cls, filename in (
        ("melt", exports["melt"], "MeltForCausalLM", "modeling_melt.py"),
        ("looplm", exports["looplm"], "LoopLMForCausalLM", "modeling_looplm.py"),
    ):
        config = json.loads((path / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == f"{filename[:-3]}.{cls}"
        assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", filename} <= {
            p.name for p in path.iterdir()
        }
        # no drift: the export's file is what the package's code generates now, and it compiles
        written = (path / filename).read_text()
        assert written == generate_source(config["model_type"])
        compile(written, filename, "exec")
        assert "DO NOT EDIT" in written and not get_relative_imports(path / filename)
        assert set(get_imports(path / filename)) <= ALLOWED_IMPORTS
    card = (exports["melt"] / "README.md").read_text()
    for fact in (
        "# MELT: distill",
        "| gate | elementwise |",
        "| chunk size | 2 |",
        INDEX_SHA,
        "| 10 / 10 |",
        "| this MELT | 1,024 | 1 |",
        "| the LoopLM, 4 loops | 4,096 | 4 |",
        "trust_remote_code=True",
    ):
        assert fact in card, fact
    assert "| this LoopLM, 4 loops | 4,096 | 4 |" in (exports["looplm"] / "README.md").read_text()


def test_our_package_loads_exports_as_before(exports):
    # no trust_remote_code: our registered classes, not the file beside the weights
    assert type(AutoModelForCausalLM.from_pretrained(exports["melt"])) is MeltForCausalLM
    demo, exported = LoopLMForCausalLM.from_pretrained(DEMO), AutoModelForCausalLM.from_pretrained(exports["looplm"])
    assert type(exported) is LoopLMForCausalLM
    for (name, a), b in zip(demo.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_hub_of_a_run_dir_cards_its_evaluation(exports, tmp_path):
    run_dir = exports["melt"].parent
    (exports["root"] / "evaluate").mkdir(exist_ok=True)
    (exports["root"] / "evaluate" / "results.json").write_text(
        json.dumps(
            {
                "results": {
                    "looplm": {"model_path": str(DEMO), "loops": 4, "accuracy": 0.75},
                    "melt": {"model_path": str(exports["melt"]), "loops": 4, "accuracy": 0.5},
                }
            }
        )
    )
    (tmp_path / "lm_eval.json").write_text(json.dumps({"task": TASK, "samples": 12, "exact_match": 0.5}))
    assert export_hub([str(run_dir), "--out", str(tmp_path / "found")]) == 0
    card = (tmp_path / "found" / "README.md").read_text()
    assert "This model is the row `melt`" in card and "| melt | 4 | - | 0.500 |" in card and INDEX_SHA in card
    assert export_hub([str(run_dir), "--out", str(tmp_path / "given"), "--eval", str(tmp_path / "lm_eval.json")]) == 0
    card = (tmp_path / "given" / "README.md").read_text()
    assert f"| {TASK} | 12 | 0.5 |" in card and "This model is the row" not in card
    weights = "model.safetensors"
    assert (tmp_path / "given" / weights).read_bytes() == (exports["melt"] / weights).read_bytes()


def test_export_hub_refuses_and_names_what_is_missing(exports, tmp_path, capsys):
    again = [str(exports["looplm"]), "--out", str(tmp_path / "again")]
    assert export_hub(again) == 0 and export_hub(again) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert export_hub(again + ["--force"]) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in exports["looplm"].iterdir():
        if item.name != "tokenizer_config.json":
            (broken / item.name).write_bytes(item.read_bytes())
    assert export_hub([str(broken), "--out", str(tmp_path / "out")]) == 2
    assert f"{broken / 'tokenizer_config.json'} is missing" in capsys.readouterr().err
    (broken / "model.safetensors").unlink()
    assert export_hub([str(broken), "--out", str(tmp_path / "out")]) == 2
    assert "model.safetensors" in capsys.readouterr().err and not (tmp_path / "out").exists()


def task_split(melt) -> EvalSplit:
    """Problems whose answers are the MELT's own greedy continuation on even rows, one token off on odd rows."""
    torch.manual_seed(3)
    prompts = torch.randint(4, 14, (12, 7))
    prompts[:4, :2] = 0  # left padding
    answers = melt.generate(
        prompts,
        attention_mask=leading_pad_mask(prompts, 0),
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, 7:]
    assert bool(((answers >= 4) & (answers <= 13)).all()), answers  # words, no special token
    answers[1::2, -1] = 4 + (answers[1::2, -1] - 3) % 10
    ids = torch.cat([prompts, answers], 1)
    labels = torch.cat([torch.full_like(prompts, -100), answers], 1)
    return EvalSplit(ids, labels, torch.ones(12, dtype=torch.long), torch.full((12,), 7), {})


@pytest.fixture(scope="module")
def package_free(exports):
    """Generation, cache bytes and an lm_eval run in the package-free process; the task is written by
    pipeline.evaluation.harness's own helper."""
    root = exports["root"]
    split = task_split(AutoModelForCausalLM.from_pretrained(exports["melt"]).eval())
    write_task(split, AutoTokenizer.from_pretrained(exports["melt"]), root / "task")
    lm_eval_args = [
        "--model",
        "hf",
        "--model_args",
        f"pretrained={exports['melt']},trust_remote_code=True",
        "--tasks",
        TASK,
        "--include_path",
        str(root / "task"),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(root / "lm_eval_out"),
    ]
    args = {
        "ids": IDS,
        "mask": leading_pad_mask(torch.tensor(IDS), 0).tolist(),
        "new": NEW_TOKENS,
        "exports": {"melt": str(exports["melt"]), "looplm": str(exports["looplm"])},
        "lm_eval": lm_eval_args,
    }
    (root / "cwd").mkdir()
    printed = run_package_free(PACKAGE_FREE_CHECKS, [json.dumps(args)], root / "cwd")
    [generated] = [line for line in printed.splitlines() if line.startswith("GENERATED ")]
    [results] = (root / "lm_eval_out").rglob("results_*.json")
    return {
        "generated": json.loads(generated.removeprefix("GENERATED ")),
        "printed": printed,
        "split": split,
        "lm_eval": json.loads(results.read_text())["results"][TASK],
    }


@pytest.mark.slow
def test_package_free_generate_equals_ours_and_melt_cache_is_constant(exports, package_free):
    ids = torch.tensor(IDS)
    remote = package_free["generated"]
    for name in ("melt", "looplm"):
        ours = AutoModelForCausalLM.from_pretrained(exports[name]).eval()
        expected = ours.generate(
            input_ids=ids,
            attention_mask=leading_pad_mask(ids, 0),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
        )
        assert remote[name]["module"].startswith("transformers_modules.")
        assert remote[name]["tokens"] == expected.tolist()
    one_set = 2 * 7 * 2 * 4 * 16 * 2 * 4  # batch x tokens x layers x KV heads x head dim x (K, V) x float32
    assert remote["melt"]["cache_bytes"] == [one_set] * 4  # one slot per token per layer, whatever the loops
    assert remote["looplm"]["cache_bytes"] == [one_set * t for t in (1, 2, 3, 4)]


@pytest.mark.slow
def test_lm_eval_hf_model_with_remote_code_matches_our_harness(exports, package_free, tmp_path):
    """lm_eval's own `hf` model (not our wrapper), package-free, on the local task our harness writes."""
    assert "exact_match" in package_free["printed"]
    data = write_eval_split(tmp_path / "eval", package_free["split"])
    ours = run_harness(exports["melt"], data, tmp_path / "work", batch_size=4)
    assert package_free["lm_eval"]["exact_match,none"] == ours["exact_match"] == 0.5
