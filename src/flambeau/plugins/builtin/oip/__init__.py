"""The Open Inference Protocol (KServe v2): REST routes and the ``GRPCInferenceService``.

:mod:`.plugin` registers both; :mod:`.rest` has the ``/v2`` routes, :mod:`.grpc_service` the
servicer served under the packages ``inference`` and ``org.pytorch.serve.grpc.openinference``,
and :mod:`.common` what they share (health, metadata, the enable switch).
"""
