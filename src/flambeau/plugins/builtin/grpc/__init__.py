"""TorchServe's gRPC inference and management APIs, as a flambeau plugin.

``plugin`` holds the hook implementations (cheap to import: worker processes load it too);
``listener`` runs the ``grpc.aio`` servers, ``auth`` secures them, ``inference`` and
``management`` are the servicers, ``protos/`` the .proto files and ``_generated/`` the modules
grpcio-tools made from them (``scripts/gen_protos.sh``).
"""
