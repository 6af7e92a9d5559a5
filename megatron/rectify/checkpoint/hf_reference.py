"""The Hugging Face side of ``verify``: a model's fp32 logits, computed in a clean process.

The HF model is loaded in a subprocess of its own rather than next to megatron: inside an
initialised megatron process, transformers 5 left the non-persistent RoPE buffer
(``rotary_emb.inv_freq``) of a loaded Llama uninitialised, which made a correct conversion look
wrong. A fresh interpreter with only torch and transformers is the reference we trust.

    python -m megatron.rectify.checkpoint.hf_reference HF_DIR TOKENS.pt OUT.pt
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megatron.rectify.checkpoint.errors import CheckpointToolError
from megatron.rectify.dev.mode import CPU_EMULATION_ENV


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the HF model in ``hf_dir`` on ``tokens`` (subprocess)."""
    with tempfile.TemporaryDirectory() as scratch:
        tokens_path, out_path = Path(scratch) / "tokens.pt", Path(scratch) / "logits.pt"
        torch.save(tokens, tokens_path)
        command = [sys.executable, "-m", __name__, hf_dir, str(tokens_path), str(out_path)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        env.pop(CPU_EMULATION_ENV, None)
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise CheckpointToolError(
                f"computing the HF reference logits failed:\n{result.stderr[-2000:]}"
            )
        return torch.load(out_path)


def main() -> None:
    hf_dir, tokens_path, out_path = sys.argv[1:4]
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        sys.exit("verify needs transformers: pip install transformers")
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(tokens_path), use_cache=False).logits.float()
    torch.save(logits, out_path)


if __name__ == "__main__":
    main()
