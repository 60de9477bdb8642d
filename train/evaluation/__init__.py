"""Evaluation of a checkpoint on the world: scoring and ablations (``evaluate``), padded batches (``batches``),
metric definitions (``scores``), the mean ablations' reference (``mean_reference``), the lm_eval model and tasks
(``lm_eval_model``, ``lm_eval_tasks/``), and the comparisons built from reports (``report``, ``scorecard``)."""
