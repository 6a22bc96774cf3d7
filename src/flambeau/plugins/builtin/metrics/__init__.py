"""TorchServe's metrics for flambeau: the metrics API, metric logs and system metrics.

``plugin`` holds the hook implementations; ``prometheus`` the ``/metrics`` route and its
hand-rolled text exposition (Java simpleclient 0.9.0's exact output); ``log_sink`` the
``ts_metrics.log`` / ``model_metrics.log`` lines; ``system`` the host and GPU collectors;
``settings`` the ``metrics_mode`` and ``metrics.yaml`` handling.
"""
