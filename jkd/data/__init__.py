"""jkd.data: chat template, OASST preprocessing, the logit store and the Grain pipeline."""
