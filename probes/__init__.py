"""probes: learning and statistics on what hooks/ produced — no forward passes here."""

from probes.patching import summarize_ablations, summarize_patches, wait_vs_random  # noqa: F401
from probes.tokens import TokenTable, compare_regimes, token_table, wait_distribution  # noqa: F401
