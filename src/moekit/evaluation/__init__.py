"""Evaluation of (compressed) MoE language models: held-out perplexity, multiple-choice tasks built
from text, a generative check against the original model, and paired comparisons -- every number
with a bootstrap 95% interval over its units. See docs/evaluation.md.

    from moekit.evaluation import evaluate, compare
    result = evaluate("merged/", "stdlib", reference="original/")
"""

from .choice import ChoiceItem, build_choice_items, evaluate_items, score_items
from .cloze import build_cloze_items
from .compare import compare, compare_runs
from .documents import Document, EvalData, load_data, load_files, stdlib_heldout
from .generate import Prompt, build_prompts, evaluate_generation, repeated_ngrams
from .harness import TASKS, EvalSettings, as_eval_model, evaluate
from .lm import EvalModel, load_model, wrap_model
from .lm_eval_bridge import run_lm_eval
from .metrics import METRICS, Metric
from .perplexity import evaluate_perplexity
from .report import load_results, markdown_report, write_report

__all__ = [
    "TASKS",
    "EvalSettings",
    "evaluate",
    "compare",
    "compare_runs",
    "EvalModel",
    "load_model",
    "wrap_model",
    "as_eval_model",
    "Document",
    "EvalData",
    "load_data",
    "load_files",
    "stdlib_heldout",
    "evaluate_perplexity",
    "ChoiceItem",
    "build_choice_items",
    "build_cloze_items",
    "score_items",
    "evaluate_items",
    "Prompt",
    "build_prompts",
    "evaluate_generation",
    "repeated_ngrams",
    "Metric",
    "METRICS",
    "run_lm_eval",
    "markdown_report",
    "write_report",
    "load_results",
]
