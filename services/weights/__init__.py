"""Policy weights on disk and between hosts.

- :mod:`~services.weights.versions`: numbered directories that appear whole or not at all
  (weight versions here, the trainer's checkpoints too), and crash-safe single-file writes.
- :mod:`~services.weights.store`: the weight store's format (safetensors plus a manifest),
  writing and verifying a version, and the read-only HTTP server replicas download from.
- :mod:`~services.weights.publish`: the trainer's side: write each version, then announce it.
- :mod:`~services.weights.fetch`: a replica's side: locate or download a version and check it.
- :mod:`~services.weights.trust`: what a replica accepts: announcements signed with
  ``weights.announce_secret``, and versions only from the allowed sources.
- :mod:`~services.weights.base_model`: the base model's safetensors and the tensors they hold.
"""
