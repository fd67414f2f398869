"""`lora-core reproduce`: the paper's comparison as a grid of arms x seeds, run and reported.

preset (YAML, train.repro.preset) -> runs (train.repro.grid: one run directory per arm and seed)
-> each run trained, evaluated on one shared item list and analysed for overlap
(train.repro.run_one), resumable arm by arm (train.repro.runner) -> one report with a claims
table whose verdicts come from confidence intervals (train.repro.claims, train.repro.paper_claims,
train.repro.report, train.repro.plots).
"""
