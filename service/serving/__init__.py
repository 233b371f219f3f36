"""The serving layer: the runtime's life cycle (load, warm, ready, drain), jobs and batching.

Built on :mod:`service.model`; knows no HTTP.
"""
