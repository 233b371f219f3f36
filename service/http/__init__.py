"""The HTTP layer: the app, the native API's and the Open Inference Protocol's routes, request
parsing, answer schemas, middleware, metrics, and the one table mapping errors to statuses.

Only this layer knows HTTP; it translates requests into calls on :mod:`service.serving`.
"""
