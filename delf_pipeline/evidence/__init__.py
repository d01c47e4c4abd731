"""Per-class evidence of ranked candidates (aggregation) and P(right | evidence) (calibration)."""
