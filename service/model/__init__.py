"""The model layer: what a served model is and does, with no HTTP and no scheduling.

The manifest and the model repository's checks, image preprocessing, the mixture's math in log
space, onnxruntime session creation and the per-model runner. Torch-free; training's export
imports the manifest schema and the mixture's formulas from here. Errors are
:class:`service.model.errors.RecmixError` subclasses, which carry no HTTP status.
"""
