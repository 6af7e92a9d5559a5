"""megatron-rectify: the Rectify-Router (EMNLP 2024) for megatron-core MoE models.

Importing this package is cheap and has no side effects: the router, dispatcher and layer specs
live in their own modules (``megatron.rectify.router`` and so on) and import megatron-core only
when used. ``megatron`` stays a namespace package, so ``megatron.core`` keeps coming from the
megatron-core wheel.
"""

__version__ = "0.1.0"
