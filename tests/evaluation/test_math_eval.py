"""Math evaluation: answer extraction (GSM8K strict/flexible, MATH boxed), the pass@k estimator,
problem files and their errors, prompts, and real models through their own generate: the S3
demo models (pass@1 = the exact-match metric's accuracy), a scripted model whose greedy
completions are known text (strict vs flexible, stop strings), the CLI, and lm-evaluation-harness."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.evaluate import main as evaluate_main
from pipeline.evaluation.contenders import load_contender
from pipeline.evaluation.data import EvalSplit
from pipeline.evaluation.math_boxed import boxed_answer, same_math_answer
from pipeline.evaluation.math_data import MathDataError, load_math_task, parse_math_specs
from pipeline.evaluation.math_eval import MathSettings, evaluate_math
from pipeline.evaluation.math_numbers import flexible_answer, gold_gsm8k, same_answer, strict_answer
from pipeline.evaluation.math_prompts import PromptConfig, render_prompts
from pipeline.evaluation.metrics import generation_accuracy
from pipeline.evaluation.passk import pass_at_k
from pipeline.models import LoopLMConfig, LoopLMForCausalLM, MeltForCausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
DEMO, EVAL_ASSETS = REPO / "assets" / "demo", REPO / "assets" / "eval"
RAW = PromptConfig(format="plain", template="{question}")  # the question is the whole prompt


# ---- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("so 3 + 4 = 7\n#### 7", "7", "7"),
        ("#### 1,234 apples, then 5 more", "1234", "5"),  # strict: after ####; flexible: the last
        ("The answer is $1,234.50.", None, "1234.50"),  # $, thousands comma, sentence period
        ("It fell to -4 degrees", None, "-4"),
        ("10-3=7", None, "7"),  # a minus between numbers is no sign
        ("#### -$5", "-5", "-5"),
        ("lists 1,2,3", None, "3"),  # not a thousands group
        ("costs 3.50. Then nothing", None, "3.50"),
        ("####42", "42", "42"),
        ("0p210p021", None, "0"),  # digits glued to a word are no number
        ("no numbers here", None, None),
    ],
)
def test_gsm8k_strict_and_flexible_extraction(text, strict, flexible):
    assert strict_answer(text) == strict
    assert flexible_answer(text) == flexible


def test_numbers_compare_by_value_and_gold_needs_the_marker():
    assert same_answer("3.50", "3.5") and same_answer("1234", "1234.0") and same_answer("-4", "-4")
    assert not same_answer("3.51", "3.5") and not same_answer(None, "3")
    assert gold_gsm8k("a\nb #### 1,000") == "1000" and gold_gsm8k("#### 2.") == "2"
    assert gold_gsm8k("no final answer") is None


@pytest.mark.parametrize(
    "text, boxed",
    [
        (r"so \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt{3}}{2}"),  # nested braces
        (r"\boxed{1} first, \boxed{{2}} last", "{2}"),  # the last box
        (r"\boxed 5$", "5"),
        (r"\fbox{x}", "x"),
        (r"\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_boxed_extraction(text, boxed):
    assert boxed_answer(text) == boxed


@pytest.mark.parametrize(
    "predicted, gold",
    [
        (r"\dfrac{1}{2}", "1/2"),
        (r"\frac12", "0.5"),
        (r"-\frac{1}{2}", "-0.5"),
        (r"\tfrac{3}{4}", r"\frac34"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"540^\circ", "540"),
        (r"540^{\circ}", "540"),
        (r"50\%", "50"),
        (r"\$5.", "5"),
        ("3.50", "3.5"),
        (r"\frac{x+1}{2}", "(x+1)/2"),
        (r"\frac{\sqrt{3}}{2}", r"\sqrt3/2"),
        ("x = 6", "6"),
        ("1,000", "1000"),
        (r"\text{(A)}", "(A)"),
        (r"\boxed{12}", "12"),
    ],
)
def test_math_answers_equal_after_normalisation(predicted, gold):
    assert same_math_answer(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [("3", "4"), (r"\frac{1}{3}", "0.33"), ("x+1/2", "(x+1)/2"), (None, "1")])
def test_math_answers_differ(predicted, gold):
    assert not same_math_answer(predicted, gold)


# ---- pass@k -----------------------------------------------------------------------------------


def test_pass_at_k_matches_enumeration_of_all_k_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(4, 1, 5)


# ---- problem files ----------------------------------------------------------------------------


def test_shipped_samples_parse():
    gsm8k = load_math_task("gsm8k", EVAL_ASSETS / "gsm8k_tiny.jsonl")
    assert [p.gold for p in gsm8k.problems] == ["7", "50", "4725", "-4", "8", "1.5"]
    math = load_math_task("math", EVAL_ASSETS / "math_tiny.jsonl")
    assert [p.gold for p in math.problems] == [
        r"\frac{7}{8}",
        "6",
        r"540^\circ",
        r"5\sqrt{2}",
        r"\frac{\sqrt{3}}{2}",
        "12",
    ]
    assert math.problems[0].question.startswith("What is") and math.problems[0].where.endswith("math_tiny.jsonl:1")


@pytest.mark.parametrize(
    "name, rows, message",
    [
        (
            "gsm8k",
            ['{"question": "q", "answer": "#### 1"}', '{"answer": "#### 2"}'],
            r"bad\.jsonl:2: row has no 'question'",
        ),
        ("gsm8k", ['{"question": "q"}'], r"bad\.jsonl:1: row has no 'answer'"),
        (
            "gsm8k",
            ["", '{"question": "q", "answer": "it is 4"}'],
            r"bad\.jsonl:2: 'answer' has no final '#### <answer>'",
        ),
        ("math", ['{"problem": "p", "solution": "it is 4"}'], r"bad\.jsonl:1: 'solution' has no \\boxed"),
        ("math", ['{"problem": "p"}'], r"bad\.jsonl:1: row has no 'answer' or 'solution'"),
        ("gsm8k", ['{"question": "q", '], r"bad\.jsonl:1: not a JSON object"),
        ("gsm8k", [""], r"has no problems"),
        ("algebra", ['{"question": "q", "answer": "#### 1"}'], r"must start with a kind"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, name, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(MathDataError, match=message):
        load_math_task(name, path)


def test_specs_and_missing_file(tmp_path):
    assert parse_math_specs(["gsm8k=a.jsonl,math500=b.jsonl", "gsm8k_hard=c"]) == [
        ("gsm8k", "a.jsonl"),
        ("math500", "b.jsonl"),
        ("gsm8k_hard", "c"),
    ]
    for bad, message in ((["gsm8k"], "write NAME=PATH"), (["gsm8k=a,gsm8k=b"], "given twice")):
        with pytest.raises(MathDataError, match=message):
            parse_math_specs(bad)
    with pytest.raises(MathDataError, match=f"{tmp_path / 'none.jsonl'} does not exist"):
        load_math_task("gsm8k", tmp_path / "none.jsonl")


# ---- prompts ----------------------------------------------------------------------------------


def test_chat_template_when_the_tokenizer_has_one(tmp_path):
    tokenizer = word_tokenizer(["q1"])
    task = load_math_task("gsm8k", write_rows(tmp_path / "t.jsonl", [("q1", "#### 1")]))
    texts, info = render_prompts(tokenizer, task, PromptConfig())
    assert texts == ["Question: q1\nAnswer:"] and info["format"] == "plain" and "Question:" in info["stop"]
    with pytest.raises(ValueError, match="no chat template"):
        render_prompts(tokenizer, task, PromptConfig(format="chat"))
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} <assistant>{% endif %}"
    )
    texts, info = render_prompts(tokenizer, task, PromptConfig())
    assert info["format"] == "chat" and texts[0].startswith("<user> q1\n\nSolve") and texts[0].endswith(" <assistant>")
    assert "Question:" not in info["stop"]
    texts, info = render_prompts(tokenizer, task, PromptConfig(instruction=""))
    assert texts == ["<user> q1 <assistant>"] and info["instruction"] == ""


# ---- real models: the S3 demo models ------------------------------------------------------------


def s3_rows(count=16, seed=0):
    """S3 problems as GSM8K rows: the demo's prompt text, and "#### <r(0)r(1)r(2)>"."""
    perms = list(itertools.permutations(range(3)))
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        gs = [perms[j] for j in torch.randint(0, 6, (i % 8 + 1,), generator=generator).tolist()]
        running = (0, 1, 2)
        for g in gs:
            running = tuple(g[running[x]] for x in range(3))
        rows.append((" ".join("p" + "".join(map(str, g)) for g in gs) + " =", "#### " + "".join(map(str, running))))
    return rows


def s3_split(tokenizer, rows) -> EvalSplit:
    """The same problems as an eval split for the exact-match metric (prompts left-padded)."""
    prompts = [tokenizer(q)["input_ids"] for q, _ in rows]
    answers = [tokenizer(" ".join(a.split()[-1]))["input_ids"] for _, a in rows]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p + a for p, a in zip(prompts, answers)])
    return EvalSplit(ids, ids.clone(), None, torch.full((len(rows),), width), {})


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The demo tokenizer with its digits decoded side by side ("2 1 0" -> "210": one number)."""
    root = tmp_path_factory.mktemp("s3")
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "looplm")
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    MeltForCausalLM.from_looplm(LoopLMForCausalLM.from_pretrained(DEMO / "looplm"), chunk_size=2).save_pretrained(
        root / "melt"
    )
    rows = s3_rows()
    task = load_math_task("gsm8k", write_rows(root / "s3.jsonl", rows))
    paths = {
        "standard": DEMO / "standard",
        "looplm": DEMO / "looplm",
        "looplm_lastkv": DEMO / "looplm",
        "melt": root / "melt",
    }
    return tokenizer, task, s3_split(tokenizer, rows), paths


def test_greedy_pass_at_1_is_the_exact_match_accuracy(s3):
    tokenizer, task, split, paths = s3
    accuracies = {}
    for name, path in paths.items():
        contender = load_contender(name, path)
        result, records = evaluate_math(contender, tokenizer, task, MathSettings(max_new_tokens=3, prompt=RAW))
        accuracies[name] = generation_accuracy(contender, split, batch_size=len(split))["accuracy"]
        assert result["pass@1"]["flexible"] == accuracies[name], name
        assert result["pass@1"]["strict"] == 0  # the S3 vocabulary has no "####"
        # per problem too: right exactly where the completion is the answer's digits
        assert all(r["correct"]["flexible"] == (r["completion"] == r["gold"]) for r in records), name
    assert 0 < accuracies["standard"] < 1 and accuracies["looplm"] > accuracies["standard"]


def test_sampling_near_temperature_zero_is_greedy_and_seeded_sampling_repeats(s3):
    tokenizer, task, _, paths = s3
    for name in ("looplm", "melt"):
        contender = load_contender(name, paths[name])
        cold = MathSettings(max_new_tokens=3, samples=3, temperature=1e-4, prompt=RAW)
        result, _ = evaluate_math(contender, tokenizer, task, cold)
        assert result["sampled"]["pass@k"] == {k: result["pass@1"] for k in ("1", "3")}, name
    contender = load_contender("standard", paths["standard"])
    hot = MathSettings(max_new_tokens=3, samples=4, ks=(1, 2, 4), temperature=1.5, top_p=0.9, seed=7, prompt=RAW)
    first, again = (evaluate_math(contender, tokenizer, task, hot)[0]["sampled"] for _ in range(2))
    assert first == again and first["seed"] == 7
    flexible = [first["pass@k"][k]["flexible"] for k in ("1", "2", "4")]
    assert flexible == sorted(flexible) and flexible[0] < flexible[-1]


# ---- real models: a scripted model whose greedy completions are known text ---------------------

# Each prompt's last word starts a chain of words, one token each, ending in <eos> (after which
# the model would go on with "9"); the tokenizer joins words with spaces.
CHAINS = {
    "q1": "The answer is 7.",
    "q2": "#### 1,234 or 5",
    "q3": "8 Question: 9",
    "q4": "x = -3.50",
    "q5": r"\boxed{\frac{1}{2}}",
}
GSM8K_ROWS = [("q1", "#### 7"), ("q2", "#### 1234"), ("q3", "#### 8"), ("q4", "#### -3.50")]
# strict: q2 only; flexible: q1 ("7." is 7), q3 (cut at the stop string "Question:"), q4


def word_tokenizer(words) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=64,
    )


def scripted_model(out_dir: Path) -> Path:
    """A LoopLM whose layers add nothing (o_proj and down_proj are zero), so the next token is a
    table lookup of the current one: one-hot embeddings, the lm_head holding the table."""
    words = list(dict.fromkeys(w for first, chain in CHAINS.items() for w in [first, *chain.split()]))
    tokenizer = word_tokenizer(words)
    vocab = tokenizer.get_vocab()
    config = LoopLMConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        total_ut_steps=2,
        max_position_embeddings=64,
    )
    model = LoopLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.zeros_like(p))
        model.model.embed_tokens.weight.copy_(torch.eye(len(vocab), 32))
        for first, chain in CHAINS.items():
            sequence = [first, *chain.split(), "<eos>", "9"]
            for here, after in zip(sequence, sequence[1:]):
                model.lm_head.weight[vocab[after], vocab[here]] = 20.0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_rows(path: Path, rows, key=("question", "answer")) -> Path:
    path.write_text("".join(json.dumps(dict(zip(key, row))) + "\n" for row in rows))
    return path


def test_scripted_completions_strict_flexible_and_stop_strings(tmp_path):
    model_dir = scripted_model(tmp_path / "model")
    MeltForCausalLM.from_looplm(LoopLMForCausalLM.from_pretrained(model_dir), chunk_size=2).save_pretrained(
        tmp_path / "melt"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = load_math_task("gsm8k", write_rows(tmp_path / "g.jsonl", GSM8K_ROWS))
    for name, path in (("looplm", model_dir), ("looplm_lastkv", model_dir), ("melt", tmp_path / "melt")):
        result, records = evaluate_math(
            load_contender(name, path), tokenizer, task, MathSettings(max_new_tokens=8, batch_size=3, prompt=RAW)
        )
        assert [r["completion"] for r in records] == ["The answer is 7.", "#### 1,234 or 5", "8 ", "x = -3.50"], name
        assert [r["answer"]["strict"] for r in records] == [None, "1234", None, None]
        assert [r["answer"]["flexible"] for r in records] == ["7", "5", "8", "-3.50"]
        assert result["pass@1"] == {"strict": 0.25, "flexible": 0.75} and result["answered"]["strict"] == 0.25
    with pytest.raises(ValueError, match=r"g\.jsonl:1: a prompt of 1 tokens \+ 64 new tokens exceeds"):
        evaluate_math(load_contender("looplm", model_dir), tokenizer, task, MathSettings(max_new_tokens=64, prompt=RAW))


def test_cli_writes_json_table_and_completions(tmp_path):
    model_dir = scripted_model(tmp_path / "model")
    gsm8k = write_rows(tmp_path / "g.jsonl", GSM8K_ROWS)
    math = write_rows(tmp_path / "m.jsonl", [("q5", "0.5")], key=("problem", "answer"))
    out = tmp_path / "report.json"
    evaluate_main(
        [
            "--model",
            f"looplm={model_dir}",
            "--model",
            f"looplm_lastkv={model_dir}",
            "--math",
            f"gsm8k={gsm8k},math={math}",
            "--math-template",
            "{question}",
            "--max-new-tokens",
            "8",
            "--math-samples",
            "2",
            "--math-k",
            "1,2",
            "--temperature",
            "0.5",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert report["math"] == {"gsm8k": str(gsm8k), "math": str(math)} and report["data"] is None
    for name in ("looplm", "looplm_lastkv"):
        result = report["results"][name]["math"]
        assert result["gsm8k"]["pass@1"] == {"strict": 0.25, "flexible": 0.75}
        assert result["gsm8k"]["sampled"]["pass@k"]["2"] == {"strict": 0.25, "flexible": 0.75}
        assert result["math"]["pass@1"] == {"boxed": 1.0} and result["math"]["prompt"]["template"] == "{question}"
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == (
        "| contender | task | answer | problems | prompt | pass@1 greedy | pass@1 sampled | pass@2 sampled |"
    )
    assert "| looplm | gsm8k | flexible | 4 | plain | 0.750 | 0.750 | 0.750 |" in table and len(table) == 2 + 2 * 3
    completions = [json.loads(line) for line in out.with_suffix(".math.jsonl").read_text().splitlines()]
    assert len(completions) == 2 * 5 and completions[1]["completion"] == "#### 1,234 or 5"
    # errors name the problem before any model loads
    bad = write_rows(tmp_path / "bad.jsonl", [("q1", "#### 7"), ("q2", "no marker")])
    for flags, message in (
        ([f"gsm8k={bad}"], r"bad\.jsonl:2: 'answer' has no final"),
        ([f"gsm8k={tmp_path / 'none.jsonl'}"], "does not exist"),
        ([f"gsm8k={gsm8k}", "--math-samples", "2", "--temperature", "0"], "temperature > 0"),
        ([f"gsm8k={gsm8k}", "--math-k", "4"], "between 1 and the samples"),
    ):
        with pytest.raises(SystemExit, match=message):
            evaluate_main(["--model", f"looplm={model_dir}", "--out", str(out), "--math", *flags])


@pytest.mark.slow
def test_lm_eval_harness_gsm8k_task_matches_our_exact_match(tmp_path):
    from pipeline.evaluation.harness_math import run_math_harness

    model_dir = scripted_model(tmp_path / "model")
    data = write_rows(tmp_path / "g.jsonl", GSM8K_ROWS)
    harness = run_math_harness(model_dir, data, tmp_path / "work", RAW, max_new_tokens=8, batch_size=3)
    ours, _ = evaluate_math(
        load_contender("looplm", model_dir),
        AutoTokenizer.from_pretrained(model_dir),
        load_math_task("gsm8k", data),
        MathSettings(max_new_tokens=8, prompt=RAW),
    )
    assert harness["problems"] == 4 and harness["prompt"] == ours["prompt"]
    assert harness["exact_match"] == ours["pass@1"] == {"strict": 0.25, "flexible": 0.75}
