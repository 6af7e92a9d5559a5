"""The register of megatron patches: every patch fits the installed megatron-core (0.19.2), and
a patched function that changed or disappeared stops the run with one line."""

from __future__ import annotations

import ast
import inspect

import pytest

from megatron.rectify import megatron_patches as patches


def test_every_registered_patch_fits_the_installed_megatron() -> None:
    problems = {name: patches.mismatch(name) for name in patches.PATCHED_FUNCTIONS}
    assert problems == dict.fromkeys(patches.PATCHED_FUNCTIONS), problems


def test_every_registered_patch_is_a_function_that_checks_itself_first() -> None:
    for name in patches.PATCHED_FUNCTIONS:
        patch = getattr(patches, name)
        source = inspect.getsource(inspect.unwrap(patch))
        assert f'check("{name}")' in source, name
        assert "megatron-core 0.19.2" in " ".join(patch.__doc__.split()), name


def test_the_fingerprint_reads_megatron_s_file_not_the_patched_attribute() -> None:
    from megatron.core.datasets import utils as dataset_utils

    target = "megatron.core.datasets.utils:compile_helpers"
    before = patches.fingerprint(target)
    original = dataset_utils.compile_helpers
    dataset_utils.compile_helpers = lambda: None
    try:
        assert patches.fingerprint(target) == before
    finally:
        dataset_utils.compile_helpers = original


def test_a_changed_function_stops_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake source of megatron's module, in which ``compile_helpers`` gained a line."""
    module = "megatron.core.datasets.utils"
    text, _ = patches._module_source(module)
    changed = text.replace("def compile_helpers():", "def compile_helpers():\n    pass", 1)
    assert changed != text
    real_module_source = patches._module_source

    def fake_module_source(name: str):
        if name == module:
            return changed, ast.parse(changed)
        return real_module_source(name)

    monkeypatch.setattr(patches, "_module_source", fake_module_source)
    monkeypatch.setattr(patches, "_CHECKED", set())
    from megatron.core.datasets import utils as dataset_utils

    before = dataset_utils.compile_helpers
    with pytest.raises(patches.MegatronPatchMismatch) as raised:
        patches.use_prebuilt_dataset_helpers()
    message = str(raised.value)
    assert "\n" not in message
    assert "'use_prebuilt_dataset_helpers'" in message
    assert "megatron.core.datasets.utils.compile_helpers changed" in message
    assert "megatron-core 0.19.2" in message
    assert isinstance(raised.value, SystemExit)  # the run ends with the line, no traceback
    assert dataset_utils.compile_helpers is before  # nothing was patched


def test_a_vanished_function_stops_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    target = "megatron.training.initialize:initialize_megatron"
    real_source_of = patches.source_of
    monkeypatch.setattr(patches, "source_of", lambda t: None if t == target else real_source_of(t))
    monkeypatch.setattr(patches, "_CHECKED", set())
    with pytest.raises(patches.MegatronPatchMismatch, match="initialize_megatron is gone"):
        patches.check("allow_cpu_only_initialisation")
