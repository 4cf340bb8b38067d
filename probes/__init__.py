"""probes: learning and statistics on what hooks/ produced — no forward passes here."""
