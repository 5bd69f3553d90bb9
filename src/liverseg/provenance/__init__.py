"""Provenance: where a registered model came from and whether it still reproduces.

`lineage` (the trail recorded as registry tags, and its check against the workspace),
`audit` (a registered model rebuilt from its trail and compared: the workspace and rebuild
in `rebuild`, the verdicts in `comparison`) and `model_card` (the card written from the
recorded facts).
"""

# The audit's absolute tolerance on metrics and curve values when a GPU was involved. Here,
# not in `comparison`, so the CLI's option default costs no import at start-up.
DEFAULT_TOLERANCE = 0.01
