"""Ablations and scaling laws from your own runs: `sweep` runs overlays, `runs` reads a run
directory back, `compare` tables and plots runs against each other, `ladder` writes a ladder of
model sizes and token budgets (the law itself is fitted in `tinyrecipe.planning.lawfit`)."""
