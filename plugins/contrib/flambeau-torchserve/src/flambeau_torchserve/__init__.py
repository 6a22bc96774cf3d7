"""The TorchServe compatibility commands of flambeau: ``torchserve`` and the two archivers.

The ``ts`` package (the handler import paths) is the other half of this distribution; see
docs/migration.md in flambeau's repository for the step-by-step switch from TorchServe.
"""
