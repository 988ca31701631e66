"""Held-out evaluation of solvers: previews at K = NFE against full-step targets, baselines,
reports (markdown, CSV, a quality-vs-NFE plot, "steps saved"). ``tools/evaluate.py`` is the CLI.

    from consolver.evaluation import make_eval_set, evaluate_scheduler
    eval_set = make_eval_set(cfg, backend, reward, num_noises=128)   # toy: 4 held-out prompts x 128
    metrics = evaluate_scheduler(eval_set, backend, scheduler, 4, reward, [r.name for r in cfg.rewards])
"""

from consolver.evaluation.baselines import BASELINES, DEISToZeroScheduler, baseline_schedulers, make_deis
from consolver.evaluation.core import (EVAL_SEED_OFFSET, EvalSet, check_schedule_match, eval_prompts, evaluate, evaluate_scheduler,
                                       make_eval_set, missing_num_steps, reward_feature_names, score_latents, solve)
from consolver.evaluation.fid import FidKid, InceptionWeightsError, build_fid_kid
from consolver.evaluation.report import (STEPS_SAVED_BASELINE, learned_solver_markdown, markdown_tables, metric_names, plot_quality, steps_saved, steps_saved_line,
                                         write_csv, write_report)

__all__ = ["STEPS_SAVED_BASELINE", "learned_solver_markdown", "BASELINES", "DEISToZeroScheduler", "EVAL_SEED_OFFSET", "EvalSet", "FidKid", "InceptionWeightsError", "baseline_schedulers", "build_fid_kid", "check_schedule_match", "eval_prompts",
           "evaluate", "evaluate_scheduler", "make_deis", "make_eval_set", "markdown_tables", "metric_names",
           "missing_num_steps", "plot_quality", "reward_feature_names", "score_latents", "solve", "steps_saved",
           "steps_saved_line", "write_csv", "write_report"]
