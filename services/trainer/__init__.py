"""The trainer service: owns the dataset and the policy, applies MAPO (or a GRPO-family
estimator) to scored groups exactly once, checkpoints, and publishes weight versions."""
