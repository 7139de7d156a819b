"""Local training without Ray: the :class:`~fedbip_ray.training.protocol.Trainer` protocol, one
local-epoch loop and one evaluation loop (:mod:`.loops`), and the sequence-classification,
image and causal-LM trainers; :func:`fedbip_ray.training.registry.make_trainer` picks one.

This package imports nothing at import time: :mod:`.device` and :mod:`.seeds` are torch-free,
the trainers load torch and transformers.
"""
