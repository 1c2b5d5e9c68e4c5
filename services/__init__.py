"""mapo-rl: service-oriented online RL post-training with MAPO and the GRPO family."""

__version__ = "0.1.0"
