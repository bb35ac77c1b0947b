"""A screening run's parts: the per-study composition, the process pool, shards, the run's accounting and UI."""
