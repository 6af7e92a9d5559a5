"""Checkpoint conversion: Hugging Face Llama/Mixtral <-> megatron distributed checkpoints of the
rectified MoE GPT, dense-to-MoE upcycling, and inspection (the tools in ``tools/checkpoint``)."""
