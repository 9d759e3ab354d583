"""Multiple-choice accuracy (gptlab/choices.py): per-ending scores against the HF model directly,
the next_line task, the JSON-lines layout, and 1 process against 2."""
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ROOT, free_port
from test_pipeline import make_docs, run_prepare, write_jsonl
from gptlab.choices import (CONTEXT_LINES, ENDINGS, Item, Task, accuracy, ending_scores, load_tasks, next_line_items,
                            read_jsonl_items)
from gptlab.errors import ConfigError

ONE = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0,
                      reduce=lambda t, reduction: t, autocast=nullcontext)
ITEMS = [Item("the data frame", [" plot", " sum mean value", " fit", " row column index"], 2),
         Item("pandas sklearn", [" model fit", " the", " a data frame plot sum", " doc3."], 0),
         Item("", [" mean", " index sum"], 1),  # no context: the ending follows EOS
         Item("value row column index sum mean the a pandas", [" plot", " frame"], 1)]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("choices")
    tok = run_prepare(tmp / "cache", write_jsonl(tmp / "docs.jsonl", make_docs(60))).tokenizer
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    return model, tok, tmp


def test_ending_scores_are_the_hf_models_log_probabilities(model_and_tokenizer):
    model, tok, _ = model_and_tokenizer
    scores = ending_scores(model, tok, ITEMS, 3, ONE, max_len=32)  # 3: batches cut across items
    for item, got in zip(ITEMS, scores):
        for ending, (total, mean) in zip(item.endings, got):
            ctx = tok(item.ctx, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
            end = tok(ending, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model.double()(input_ids=torch.tensor([ctx + end])).logits[0].log_softmax(-1)
            model.float()
            direct = [logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(end)]
            assert total == pytest.approx(sum(direct), abs=1e-5)
            assert mean == pytest.approx(sum(direct) / len(direct), abs=1e-5)
    acc = accuracy(model, tok, Task("hand", ITEMS), 3, ONE, max_len=32)
    by_sum = sum(max(range(len(s)), key=lambda e: s[e][0]) == it.label for it, s in zip(ITEMS, scores)) / len(ITEMS)
    by_mean = sum(max(range(len(s)), key=lambda e: s[e][1]) == it.label for it, s in zip(ITEMS, scores)) / len(ITEMS)
    assert acc == {"eval/hand/acc": by_sum, "eval/hand/acc_norm": by_mean}


def test_a_long_context_is_cut_from_the_left(model_and_tokenizer):
    model, tok, _ = model_and_tokenizer
    long = Item(" ".join(["data frame"] * 40), [" plot", " sum"], 0)
    cut = Item(tok.decode(tok(long.ctx, add_special_tokens=False)["input_ids"][-(12 - 1):]), long.endings, 0)
    (a,) = ending_scores(model, tok, [long], 2, ONE, max_len=12)
    (b,) = ending_scores(model, tok, [cut], 2, ONE, max_len=12)
    assert a[0] == pytest.approx(b[0], abs=1e-6)  # " plot" is one token: 11 of context remain


def test_next_line_items_pair_the_real_next_line_with_other_documents_lines():
    docs = [f"def f{d}():\n" + "".join(f"    value_{d}_{i} = compute({i})\n" for i in range(12)) for d in range(6)]
    items = next_line_items(docs, 20, seed=0)
    assert len(items) == 20 and items == next_line_items(docs, 20, seed=0)  # deterministic
    for item in items:
        assert len(item.endings) == ENDINGS and len(set(item.endings)) == ENDINGS
        right = item.endings[item.label]
        doc = next(d for d in docs if item.ctx in d)
        assert item.ctx + right + "\n" in doc  # the real continuation
        assert all(e not in item.ctx for i, e in enumerate(item.endings) if i != item.label)  # not nearby
        assert 1 <= len(item.ctx.splitlines()) <= CONTEXT_LINES
    assert len({it.label for it in items}) > 1
    assert next_line_items(["def f():\n    return 1\n"] * 3, 5, seed=0) == []  # too few distinct lines


def test_jsonl_tasks_read_hellaswag_layout_and_fail_in_one_line(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text(json.dumps({"ctx": "A man", "endings": ["runs.", " sits."], "label": 1}) + "\n\n")
    assert read_jsonl_items(path) == [Item("A man", [" runs.", " sits."], 1)]  # a space before an ending
    tasks = load_tasks([str(path)], None, lambda: [], seed=0)
    assert [(t.name, len(t.items)) for t in tasks] == [("mini", 1)]
    path.write_text(json.dumps({"ctx": "A", "endings": ["b"], "label": 3}) + "\n")
    with pytest.raises(ConfigError, match=r"mini\.jsonl line 1: label 3 is not one of its 1 endings$"):
        read_jsonl_items(path)
    for bad in ('{"context": "A"}', '{"ctx": "A", "endings": ["b"], "label": 0', "ctx, endings"):
        path.write_text("\n" + bad + "\n")
        with pytest.raises(ConfigError, match=r"mini.jsonl line 2 is not a HellaSwag-layout item"):
            read_jsonl_items(path)


RANKS_SCRIPT = """
import json, sys, torch
from accelerate import Accelerator
from transformers import AutoTokenizer, GPT2LMHeadModel
from gptlab.choices import Task, read_jsonl_items, accuracy
from gptlab.distributed import end_processes
acc = Accelerator(cpu=True)
model = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
result = accuracy(model, tok, Task("t", read_jsonl_items(sys.argv[2])), 3, acc, max_len=32)
if acc.is_main_process:
    print("RESULT", json.dumps({"world": acc.num_processes, **result}))
end_processes(acc)  # gloo's threads wound down before exit, or the process can abort
"""


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_accuracy(model_and_tokenizer, tmp_path):
    model, tok, _ = model_and_tokenizer
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"ctx": it.ctx, "endings": it.endings, "label": it.label} for it in ITEMS * 3]  # 12: unequal shares
    rows += [{"ctx": "frame data plot", "endings": [" sum", " mean", " fit"], "label": 2}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "s.py").write_text(RANKS_SCRIPT)
    results = []
    for n in (1, 2):
        launch = ["--multi_gpu", "--num_processes", "2"] if n == 2 else ["--num_processes", "1"]
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port",
                               str(free_port()), str(tmp_path / "s.py"), str(tmp_path / "m"), str(tmp_path / "t.jsonl")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    assert [r.pop("world") for r in results] == [1, 2]
    assert results[0] == results[1]
    assert results[0] == accuracy(model, tok, Task("t", read_jsonl_items(tmp_path / "t.jsonl")), 3, ONE, 32)


@pytest.mark.slow
def test_choices_bench_scores_a_runs_checkpoints(tmp_path, cache_dir, tiny_corpus):
    from conftest import run_training

    run_dir = tmp_path / "run"
    run_training([f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]",
                  "trainer.save_every=4", "trainer.sample_prompts=[]"])
    out = tmp_path / "choices.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "choices.py"), str(run_dir), "--items", "12",
                           "--limit", "4", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [c["step"] for c in result["curve"]] == [0, 4, 8] and result["items"] == 12
    assert all(0 <= c["acc"] <= 1 and 0 <= c["acc_norm"] <= 1 for c in result["curve"])
    assert result["cost"]["items"] == 4 and result["cost"]["seconds"] > 0  # (a smoke run's evaluations: 1 s apart)
    assert result["command"].startswith("python bench/choices.py")


def test_a_hub_dataset_task_loads_from_the_hf_cache_offline(hub):
    from conftest import cache_repo

    rows = [{"ctx": "A man", "endings": ["runs.", "sits."], "label": "1", "activity_label": "x"},
            {"ctx": "The dog ", "endings": ["barks.", "meows."], "label": "0", "activity_label": "y"}]
    cache_repo(hub, "org/mini-swag", {"data/validation-00000-of-00001.jsonl":
                                      "".join(json.dumps(r) + "\n" for r in rows).encode()}, "dataset")
    (task,) = load_tasks(["hf:org/mini-swag"], None, lambda: [], seed=0)
    assert task.name == "mini-swag"
    assert task.items == [Item("A man", [" runs.", " sits."], 1), Item("The dog ", ["barks.", "meows."], 0)]
    assert load_tasks(["hf:org/mini-swag:validation"], 1, lambda: [], seed=0)[0].items == task.items[:1]


def test_tasks_are_scored_with_each_evaluation_or_at_their_own_interval(tmp_path, cache_dir, tiny_corpus):
    from conftest import read_metrics, run_training, series

    for every, steps in (("null", [4, 8]), ("3", [3, 6, 8])):
        run_dir = tmp_path / every
        run_training([f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]",
                      f"tasks.every={every}", "trainer.sample_prompts=[]"])
        rows = read_metrics(run_dir)
        assert [s for s, _ in series(rows, "eval/next_line/acc")] == steps
        assert [s for s, _ in series(rows, "eval/next_line/acc_norm")] == steps
        assert all(0 <= v <= 1 for _, v in series(rows, "eval/next_line/acc"))
        assert [s for s, _ in series(rows, "eval/loss")] == [4, 8]
