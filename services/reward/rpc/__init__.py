"""Generated gRPC code of ``proto/reward.proto`` (package ``mapo.reward.v1``).

Never edit the ``reward_pb2*`` files by hand: change the proto and run ``make proto``.
Clients import only this package and :mod:`services.reward.client`, never the server.
"""
