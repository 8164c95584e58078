"""Orchestration, CLI, verification and reports: from a Hugging Face model to a verified Q/DQ ONNX and a plan."""


class PipelineError(ValueError):
    """Bad input to the pipeline; the message names the problem and the fix."""
