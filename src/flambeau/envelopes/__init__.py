"""Request envelopes: protocol shapes (Vertex, KServe v1/v2, Seldon) around a handler's rows.

Each envelope is a builtin plugin strategy (:mod:`flambeau.envelopes.plugin`), chosen for the
whole server with ``service_envelope`` or per model with ``envelope:`` in model-config, and
applied in the server process around the batch queue (:mod:`flambeau.envelopes.dataplane`).
"""
