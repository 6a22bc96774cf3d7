"""``ts.torch_handler``: BaseHandler and TorchServe's default handlers, from flambeau's SDK.

The image handlers import without torchvision and Pillow; only decoding image bytes needs
them (see docs/handlers.md of flambeau).
"""
