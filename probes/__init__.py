"""probes: learning and statistics on what hooks/ produced — no forward passes here."""

from waitlens.probes.estimator import LinearProbe
from waitlens.probes.folds import make_folds, shuffle_labels
from waitlens.probes.linear import CSV_COLUMNS, ProbeResult, fit_layer_probes
from waitlens.probes.metrics import auroc, expected_calibration_error
from waitlens.probes.patching import summarize_ablations, summarize_patches, wait_vs_random
from waitlens.probes.probe_data import load_probe_data
from waitlens.probes.stats import InsufficientDataError, bh_qvalues, cluster_bootstrap, wilson_ci
from waitlens.probes.tokens import TokenTable, compare_regimes, token_table, wait_distribution
from waitlens.probes.transfer import TransferResult, probe_cosines, transfer_matrix

__all__ = [
    "CSV_COLUMNS", "LinearProbe", "ProbeResult", "TransferResult", "auroc", "expected_calibration_error",
    "fit_layer_probes", "load_probe_data", "make_folds", "probe_cosines", "shuffle_labels", "transfer_matrix",
    "summarize_ablations", "summarize_patches", "wait_vs_random", "TokenTable", "compare_regimes", "token_table",
    "wait_distribution", "InsufficientDataError", "bh_qvalues", "cluster_bootstrap", "wilson_ci",
]
