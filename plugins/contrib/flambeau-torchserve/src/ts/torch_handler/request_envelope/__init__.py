"""``ts.torch_handler.request_envelope``: TorchServe's worker-side envelope classes.

flambeau applies ``service_envelope`` in the server (:mod:`flambeau.envelopes`), around the
batch queue, with a different interface; these classes are for handlers that wrap their own
``handle`` in an envelope, as TorchServe's worker did. They are a small port of TorchServe
0.12's, behaviour for behaviour, without numpy.
"""
