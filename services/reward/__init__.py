"""The reward/verifier service: a gRPC server scoring completions with pure verifiers.

Modules: ``verifiers`` (the reward functions), ``registry`` (task names to rewards),
``worker`` and ``pool`` (verification under deadlines in supervised processes),
``validation``, ``servicer`` and ``server`` (the gRPC service, ``mapo reward serve``),
``metrics``, ``client`` (what other services import, with ``rpc``, the generated stubs),
``protogen`` (``make proto``) and ``healthcheck`` (the container probe).
"""
