"""The one error type of the checkpoint tools: the tools print its message and exit 2."""


class CheckpointToolError(Exception):
    """A problem with the user's input (architecture, shapes, paths, flags), stated with the fix."""
