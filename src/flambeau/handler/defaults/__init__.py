"""TorchServe's builtin handlers: image_classifier, image_segmenter, object_detector,
text_classifier and their bases (vision_handler, text_handler).

They import without torchvision, Pillow, torchtext or Captum; the features that need those
import them on first use and fail with an error that says what to install.
"""
