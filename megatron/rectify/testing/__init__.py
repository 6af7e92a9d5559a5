"""Test and development helpers for megatron-rectify (never needed on GPU machines).

``cpu_emulation`` lets megatron-core run on CPU-only machines over gloo; ``multiprocess`` runs a
test body in several processes with megatron's ``parallel_state`` initialised. Importing this
package has no side effects.
"""
