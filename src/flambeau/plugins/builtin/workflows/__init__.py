"""Workflows: DAGs of models and Python functions, served from TorchServe's .war archives.

:mod:`.spec` parses and validates the workflow spec, :mod:`.dag` executes it, :mod:`.registry`
holds the registered workflows, :mod:`.routes` and :mod:`.grpc_service` expose them, and
:mod:`.plugin` is the plugin module (``flambeau.plugins.builtin.workflows.plugin``).
"""
