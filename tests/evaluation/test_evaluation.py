"""Evaluation: the zero-shot baseline in Ouro's setting, accuracy by generation, cache bytes."""

import json

import torch

from pipeline.data.padding import leading_pad_mask
from pipeline.evaluate import main as evaluate_main
from pipeline.evaluation.contenders import Contender, load_contender
from pipeline.evaluation.data import EvalSplit
from pipeline.evaluation.metrics import evaluate
from pipeline.models import MeltForCausalLM
from tests.model_helpers import tiny_looplm


def ouro_lastkv_greedy(lm, prompt, new_tokens):
    """Independent: prompt through the LoopLM with its full cache; then each decoded token runs
    with every earlier token's loop entries replaced by that token's last-loop KV."""
    cfg = lm.config
    T, N = cfg.total_ut_steps, cfg.num_hidden_layers
    with torch.no_grad():
        out = lm(prompt, use_cache=True)
        cache = out.past_key_values
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for layer in range(N):  # collapse the prompt to its last loop
            last = cache.layers[cache.slot(T - 1, layer)]
            for loop in range(T - 1):
                cache.layers[cache.slot(loop, layer)].keys = last.keys.clone()
                cache.layers[cache.slot(loop, layer)].values = last.values.clone()
        for _ in range(new_tokens - 1):
            position = cache.get_seq_length()
            out = lm(tokens[-1], past_key_values=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            for layer in range(N):
                last = cache.layers[cache.slot(T - 1, layer)]
                for loop in range(T - 1):
                    cache.layers[cache.slot(loop, layer)].keys[:, :, position] = last.keys[:, :, position]
                    cache.layers[cache.slot(loop, layer)].values[:, :, position] = last.values[:, :, position]
    return torch.cat(tokens, 1)


def test_lastkv_baseline_in_ouro_setting(tmp_path):
    lm = tiny_looplm()
    lm.save_pretrained(tmp_path / "lm")
    contender = load_contender("looplm_lastkv", tmp_path / "lm")
    prompt = torch.randint(3, 97, (1, 7))
    tokens, cache = contender.generate(prompt, torch.ones_like(prompt), 6)
    assert tokens.tolist() == ouro_lastkv_greedy(lm, prompt, 6).tolist()
    full = lm.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 7:]
    assert tokens[:, 0].tolist() == full[:, 0].tolist()  # the first token comes from the full-cache prompt
    assert (
        cache.nbytes * lm.config.total_ut_steps
        == lm(torch.cat([prompt, tokens[:, :-1]], 1), use_cache=True).past_key_values.nbytes
    )


def _split(lm, n=24, prompt_len=6, answer_len=3):
    """A split whose answers are the model's own greedy continuation for half the rows."""
    torch.manual_seed(5)
    prompts = torch.randint(3, 97, (n, prompt_len))
    prompts[: n // 3, :2] = 0  # some left padding
    mask = leading_pad_mask(prompts, 0)
    out = lm.generate(
        prompts,
        attention_mask=mask,
        max_new_tokens=answer_len,
        min_new_tokens=answer_len,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, prompt_len:]
    answers = out.clone()
    answers[1::2, -1] = (answers[1::2, -1] + 1) % 97  # odd rows: wrong last answer token
    ids = torch.cat([prompts, answers], 1)
    labels = torch.full_like(ids, -100)
    labels[:, prompt_len:] = ids[:, prompt_len:]
    difficulty = torch.arange(n) % 3 + 1
    return EvalSplit(ids, labels, difficulty, torch.full((n,), prompt_len), {})


def test_accuracy_by_generation_counts_exact_answers():
    lm = tiny_looplm()
    split = _split(lm)
    contender = Contender("looplm", lm, lm.config.total_ut_steps, sum(p.numel() for p in lm.parameters()))
    result = evaluate(contender, split, batch_size=5)
    assert result["accuracy"] == 0.5
    for k in (1, 2, 3):  # rows k-1, k+2, ...: alternate parity, so half right at every k
        assert result["samples_by_difficulty"][k] == 8
        assert result["accuracy_by_difficulty"][k] == 0.5
    assert len(result["loop_perplexity"]) == 3 and abs(sum(result["exit_distribution"]) - 1) < 1e-6
    assert sum(result["exit_histogram"]["counts"]) == result["scored_tokens"] == 24 * 3


def test_cli_writes_json_and_table_with_cache_ratios(tmp_path):
    from tests.model_helpers import write_eval_split

    lm = tiny_looplm()
    data = write_eval_split(tmp_path / "eval", _split(lm))
    lm.save_pretrained(tmp_path / "lm")
    tiny_looplm(total_ut_steps=1).save_pretrained(tmp_path / "std")
    MeltForCausalLM.from_looplm(lm, chunk_size=2).save_pretrained(tmp_path / "melt")
    out = tmp_path / "report.json"
    evaluate_main(
        [
            "--model",
            f"standard={tmp_path / 'std'}",
            "--model",
            f"looplm={tmp_path / 'lm'}",
            "--model",
            f"looplm_lastkv={tmp_path / 'lm'}",
            "--model",
            f"melt={tmp_path / 'melt'}",
            "--data",
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "8",
        ]
    )
    results = json.loads(out.read_text())["results"]
    assert results["looplm"]["accuracy"] == 0.5
    kv = {name: r["kv_cache_bytes"] for name, r in results.items()}
    assert kv["melt"] == kv["standard"] == kv["looplm_lastkv"] == kv["looplm"] // 3
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == 6 and "| melt | 3 |" in table
    assert results["melt"]["scoring_chunking"] == "decode" and results["looplm"]["scoring_chunking"] == "unchunked"
    # --scoring-chunking forward: MELT's rows re-chunked with its own chunk size, and said so
    forward = tmp_path / "forward.json"
    evaluate_main(
        [
            "--model",
            f"melt={tmp_path / 'melt'}",
            "--data",
            str(data),
            "--out",
            str(forward),
            "--batch-size",
            "8",
            "--scoring-chunking",
            "forward",
        ]
    )
    melt = json.loads(forward.read_text())["results"]["melt"]
    assert melt["scoring_chunking"] == "forward" and melt["perplexity"] != results["melt"]["perplexity"]
    # --dtype bfloat16 (what --dtype auto picks on a GPU): the model and its cache in bf16, half the bytes
    half = tmp_path / "bf16.json"
    evaluate_main(
        [
            "--model",
            f"melt={tmp_path / 'melt'}",
            "--data",
            str(data),
            "--out",
            str(half),
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
        ]
    )
    melt = json.loads(half.read_text())["results"]["melt"]
    assert (melt["device"], melt["dtype"]) == ("cpu", "bfloat16") and results["melt"]["dtype"] == "float32"
    assert melt["kv_cache_bytes"] * 2 == results["melt"]["kv_cache_bytes"]
    assert abs(melt["perplexity"] - results["melt"]["perplexity"]) < 0.05 * results["melt"]["perplexity"]


def test_labelled_contenders_compare_models_of_one_kind(tmp_path):
    """melt:a=DIR, melt:b=DIR: two MELTs in one run, each under its label; one name twice or an
    unknown kind is refused naming it."""
    import pytest

    from tests.model_helpers import write_eval_split

    lm = tiny_looplm()
    data = write_eval_split(tmp_path / "eval", _split(lm))
    MeltForCausalLM.from_looplm(lm, chunk_size=2).save_pretrained(tmp_path / "a")
    MeltForCausalLM.from_looplm(lm, chunk_size=2, gate="overwrite").save_pretrained(tmp_path / "b")
    out = tmp_path / "labels.json"
    models = ["--model", f"melt:a={tmp_path / 'a'}", "--model", f"melt:b={tmp_path / 'b'}"]
    assert evaluate_main(models + ["--data", str(data), "--out", str(out), "--batch-size", "8"]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"melt:a", "melt:b"}
    assert results["melt:a"]["model_path"] == str(tmp_path / "a") and results["melt:a"]["loops"] == 3
    assert results["melt:a"]["perplexity"] != results["melt:b"]["perplexity"]  # two models, not one twice
    # --no-perplexity: accuracy and KV bytes only, the same accuracy
    quick = tmp_path / "quick.json"
    assert evaluate_main(models + ["--data", str(data), "--out", str(quick), "--no-perplexity"]) == 0
    fast = json.loads(quick.read_text())["results"]["melt:a"]
    assert "perplexity" not in fast and fast["accuracy"] == results["melt:a"]["accuracy"]
    assert fast["kv_cache_bytes"] == results["melt:a"]["kv_cache_bytes"]
    for bad, message in (
        ([models[1], models[1]], "given twice"),
        ([f"mlt:a={tmp_path / 'a'}"], "unknown contender 'mlt:a'"),
        ([f"melt:={tmp_path / 'a'}"], "unknown contender 'melt:'"),
    ):
        with pytest.raises(SystemExit, match=message):
            evaluate_main([a for m in bad for a in ("--model", m)] + ["--data", str(data), "--out", str(out)])


def test_eval_splits_are_read_without_shared_memory_compressed_or_not(tmp_path, monkeypatch):
    """Evaluations side by side on one machine must not race for streaming's shared-memory prefix
    (FileExistsError '/000083_locals' in a reproduction): the split is read in place, with no shared
    memory at all; a zstd split reads the same rows as a plain one."""
    import multiprocessing.shared_memory

    from pipeline.evaluation.data import load_eval_split
    from tests.model_helpers import write_eval_split

    split = _split(tiny_looplm())
    plain = write_eval_split(tmp_path / "plain", split)
    zipped = write_eval_split(tmp_path / "zstd", split, compression="zstd")
    assert not list(zipped.glob("*/*.mds")) and not list(zipped.glob("*.mds"))  # only compressed shards

    def no_shared_memory(*args, **kwargs):
        raise AssertionError("an eval split must be read without shared memory")

    monkeypatch.setattr(multiprocessing.shared_memory.SharedMemory, "__init__", no_shared_memory)
    for path in (plain, zipped, zipped):  # twice: the second read finds the decompressed shards
        loaded = load_eval_split(path)
        assert torch.equal(loaded.input_ids, split.input_ids) and torch.equal(loaded.labels, split.labels)
        assert torch.equal(loaded.prompt_length, split.prompt_length)
