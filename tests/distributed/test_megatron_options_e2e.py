"""megatron training options with rectification, end to end: ``pretrain_gpt_rectify.py`` under
torchrun in CPU mode (gloo, CPU emulation), ``--moe-rectify ir+fr``.

One reference run (EP = 2, 4 layers and one multi-token-prediction layer, 2 micro-batches per
rank, 4 iterations, a ``torch_dist`` checkpoint at iteration 2) is what the options are
compared with: an option that must not change the arithmetic (recompute, the distributed
optimizer) gives the same logged values, and a run resumed from iteration 2 under another layout
(virtual pipeline stages) or through another checkpoint format (``--ckpt-format torch``)
continues with the reference's values. Multi-token prediction is in the reference (it must
train, and it then runs with every option below: one run fewer). Context parallelism needs
Transformer Engine attention: refused on the local spec (tests/unit/test_megatron_options.py).

The iteration log prints losses with 7 significant digits, the rates with 2 decimals and the
grad norm with 3; "the same values" below means the same printed values.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_pretrain_e2e import ok, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

#: On top of test_pretrain_e2e's TINY (later flags win): 4 layers (2 pipeline stages of 2
#: virtual stages), global batch 16 = 2 micro-batches of 4 per data-parallel rank, 4 iterations,
#: no evaluation.
LAYOUT = [
    "--num-layers",
    "4",
    "--global-batch-size",
    "16",
    "--train-iters",
    "4",
    "--eval-iters",
    "0",
]
#: Multi-token prediction needs rotary (or no) position embeddings in megatron-core 0.19.2, and
#: untied output weights once it sits on a later pipeline stage than the embedding: there
#: megatron-core 0.19.2 allocates the output layer's own weight but its checkpoint code asserts
#: that an MTP stage has none ("assert output_layer_weight_key not in sharded_state_dict").
MTP = [
    "--mtp-num-layers",
    "1",
    "--position-embedding-type",
    "rope",
    "--untie-embeddings-and-output-weights",
]
#: The reference's layout and model: EP = 2 on 2 processes (DP = 2 for the dense weights), MTP.
MODEL = ["--expert-model-parallel-size", "2", *MTP]
ITERATIONS = [1, 2, 3, 4]

#: What an iteration line carries that the comparisons read (name: value pairs).
METRIC = re.compile(
    r"(lm loss|mtp_\d+ loss|load_balancing_loss|rectify_\w+|grad norm): ([0-9.E+-]+)"
)
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")


def run(nproc: int, *extra: str) -> str:
    return ok(torchrun(nproc, *LAYOUT, *extra))


def metrics(log: str) -> dict[int, dict[str, float]]:
    """Per logged training iteration: lm loss, aux loss, MTP losses, rectify rates, grad norm."""
    found = {}
    for line in log.splitlines():
        match = ITERATION.search(line)
        if match and "lm loss" in line:
            found[int(match.group(1))] = {k: float(v) for k, v in METRIC.findall(match.group(2))}
    return found


def per_iteration(logged: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """The logged values of a run with the mean of its first two iterations undone.

    megatron-core 0.19.2's ``training_log`` does not reset its loss sums after the first
    iteration a run logs (``should_reset = not is_first_iteration``), so with ``--log-interval
    1`` the *second* logged loss of every run is the mean of its first two: iteration 2 of a
    fresh run, iteration 4 of a run resumed at 2 (the parameters are not affected; it is why a
    resumed run seemed to differ "at resume + 2" in test_pretrain_e2e). Only the names that
    megatron sums (those ending in ``loss``) are affected; rates and the grad norm are not. The
    undone value carries the rounding of two printed values: compare it to 2e-6.
    """
    first, second = sorted(logged)[:2]
    undone = {i: dict(values) for i, values in logged.items()}
    for name, value in logged[second].items():
        if name.endswith("loss"):
            undone[second][name] = 2 * value - logged[first][name]
    return undone


def assert_same(got: dict[int, dict[str, float]], expected: dict[int, dict[str, float]]) -> None:
    """Every iteration of ``got`` has ``expected``'s printed values (names and numbers)."""
    for iteration, values in got.items():
        assert values.keys() == expected[iteration].keys(), iteration
        for name, value in values.items():
            assert value == pytest.approx(expected[iteration][name], rel=0, abs=2e-6), (
                iteration,
                name,
                got,
                expected,
            )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """The reference run's values (iterations 1-4), its checkpoint folder (iterations 2, 4) and
    its log."""
    checkpoint = tmp_path_factory.mktemp("reference") / "ckpt"
    log = run(2, *MODEL, "--save", str(checkpoint), "--save-interval", "2")
    values = per_iteration(metrics(log))
    assert sorted(values) == ITERATIONS, log[-3000:]
    return values, checkpoint, log


def test_reference_trains_with_multi_token_prediction(reference) -> None:
    """``--mtp-num-layers 1``: the MTP layer is built from the rectified spec of the last
    decoder layer (megatron's GPT builder does the same with its own spec; without the block
    megatron-core 0.19.2 fails in the loss with an IndexError). LM and MTP losses fall, every
    layer's routing is rectified, and the MTP layer is reported after the decoder's layers
    under megatron's numbering (num_layers + 1)."""
    values, _, log = reference
    assert values[4]["lm loss"] < values[1]["lm loss"] - 0.1, values
    assert values[4]["mtp_1 loss"] < values[1]["mtp_1 loss"], values
    assert values[1]["rectify_rectified_pct"] > 0 and values[1]["rectify_filled_in_pct"] > 0
    pattern = (
        r"MoE layer (\d(?: \(MTP \d\))?): dropped .*filled-in ([0-9.]+) % \| rectified ([0-9.]+) %"
    )
    summary = {layer: (float(f), float(r)) for layer, f, r in re.findall(pattern, log)}
    assert sorted(summary) == ["1", "2", "3", "4", "5 (MTP 1)"], log[-3000:]
    assert min(min(rates) for rates in summary.values()) > 0, summary


def test_selective_recompute_of_moe_and_moe_act_gives_the_same_run(reference) -> None:
    """``--recompute-modules moe`` runs every MoE layer's forward again in the backward pass:
    the router must decide again, identically (the decision and the IR side batch are rebuilt,
    never reused: tests/unit/test_moe_recompute.py). ``moe_act`` needs ``--moe-grouped-gemm``
    in megatron's config check; the local spec's experts (``SequentialMLP``) have no activation
    checkpoint, so on the CPU it is accepted and changes nothing (Transformer Engine's grouped
    experts recompute the activation of all their rows, IR rows included)."""
    log = run(
        2,
        *MODEL,
        "--recompute-granularity",
        "selective",
        "--recompute-modules",
        "moe",
        "moe_act",
        "--moe-grouped-gemm",
    )
    assert re.search(r"recompute_modules \.+ \['moe', 'moe_act'\]", log)
    assert_same(per_iteration(metrics(log)), reference[0])


def test_full_recompute_gives_the_same_run(reference) -> None:
    log = run(
        2,
        *MODEL,
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "uniform",
        "--recompute-num-layers",
        "1",
    )
    assert re.search(r"recompute_granularity \.+ full", log)
    assert_same(per_iteration(metrics(log)), reference[0])


def test_distributed_optimizer_and_a_torch_format_resume_continue_the_reference(
    reference, tmp_path: Path
) -> None:
    """The distributed optimizer (dense parameters sharded over DP = 2) gives the reference's
    iterations 1-2; its ``--ckpt-format torch`` checkpoint of iteration 2 (``torch.save`` files
    per rank, the optimizer shards in ``distrib_optim.pt``) resumes into the reference's
    iterations 3-4. Resuming needs ``megatron_patches.fix_distributed_optimizer_loading``
    (three megatron-core 0.19.2 bugs of the distributed optimizer with torch's Adam in fp32:
    the load fails, and without the shared-``step`` fix iteration 4 differs)."""
    checkpoint = tmp_path / "ckpt"
    options = [*MODEL, "--use-distributed-optimizer", "--ckpt-format", "torch"]
    first = run(
        2, *options, "--save", str(checkpoint), "--save-interval", "2", "--exit-interval", "2"
    )
    first_values = per_iteration(metrics(first))
    assert sorted(first_values) == [1, 2]
    assert_same(first_values, reference[0])
    saved = checkpoint / "iter_0000002"
    assert (saved / "mp_rank_00_000" / "distrib_optim.pt").is_file()
    assert not (saved / "metadata.json").exists()  # not torch_dist

    resumed = run(2, *options, "--load", str(checkpoint))
    resumed_values = per_iteration(metrics(resumed))
    assert sorted(resumed_values) == [3, 4]
    assert_same(resumed_values, reference[0])


def test_virtual_pipeline_stages_continue_the_reference(reference) -> None:
    """PP = 2 with 2 virtual stages per rank (layers 1 and 3 on the first rank, 2 and 4 on the
    second; the interleaved schedule) and EP = 2, on 4 processes, resumed from the reference's
    iteration 2 (its ``torch_dist`` checkpoint reshards from PP = 1): iterations 3-4 are the
    reference's. Resuming is the only fair start: megatron seeds each pipeline rank's
    initialisation differently, so a fresh PP run starts from other weights. The token groups
    routed together are the same (DP = 2, micro-batches of 4), so IR and FR decide the same.
    The MTP layer sits in the last virtual stage of the last rank, which is then given the
    input tokens as well as the labels (megatron's batch broadcast leaves them out of a last
    pipeline stage unless told that it holds MTP layers)."""
    values, checkpoint, _ = reference
    log = run(
        4,
        *MODEL,
        "--pipeline-model-parallel-size",
        "2",
        "--num-layers-per-virtual-pipeline-stage",
        "1",
        "--load",
        str(checkpoint),
        "--ckpt-step",
        "2",
    )
    assert re.search(r"virtual_pipeline_model_parallel_size \.+ 2", log)
    resumed = per_iteration(metrics(log))
    assert sorted(resumed) == [3, 4]
    assert_same(resumed, values)
