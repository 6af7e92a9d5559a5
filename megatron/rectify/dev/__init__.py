"""megatron-rectify's CPU development mode (never needed on GPU machines).

* :mod:`~megatron.rectify.dev.mode` - the switches: ``--cpu-emulation`` /
  ``MEGATRON_RECTIFY_CPU_EMULATION``, the megatron flags CPU mode implies, the replica-check
  hook's environment variable. Constants only; the training entry point reads them and imports
  the rest of this package only when a run asks for CPU mode.
* :mod:`~megatron.rectify.dev.cpu_emulation` - lets megatron-core run on CPU-only machines
  over gloo.
* :mod:`~megatron.rectify.dev.multiprocess` - runs a test body in several gloo processes with
  megatron's ``parallel_state`` initialised.
* :mod:`~megatron.rectify.dev.replica_check` - after a test run, every data-parallel replica
  must hold the same weights.
* :mod:`~megatron.rectify.dev.tiny_model` - the tiny MoE GPT command line (in named pieces) and
  child-process environment that tests, the compatibility table and the scripts share.

Importing this package has no side effects.
"""
