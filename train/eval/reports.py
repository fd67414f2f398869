"""Evaluation results for people: the names other modules import, from the modules that do each job.

- train.eval.result_files: results.json / results.md / generations.jsonl written (atomically,
  through lora_core.common.files), read back and checked;
- train.eval.report_markdown: results.md and comparison.md;
- train.eval.compare: `lora-core compare` (paired differences against the first file);
- train.eval.compare_plot: comparison.png;
- train.eval.metric_registry: what each metric is (direction, proportion or mean, unit, label).
"""
from __future__ import annotations

from lora_core.train.eval.compare import compare_results
from lora_core.train.eval.compare_plot import scatter_png
from lora_core.train.eval.paired import error_bar
from lora_core.train.eval.report_markdown import (compare_markdown, format_interval, format_metric, markdown_table,
                                                  results_markdown)
from lora_core.train.eval.result_files import check_results, load_results, write_results

__all__ = ["markdown_table", "results_markdown", "write_results", "load_results", "check_results",
           "compare_markdown", "scatter_png", "compare_results", "format_metric", "format_interval", "error_bar"]
