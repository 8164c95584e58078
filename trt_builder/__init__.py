"""TensorRT engine build, runtime and inspection. `tensorrt` is imported lazily: the rest of smoothtrt and this
package's own import work without it."""


class BuildError(RuntimeError):
    """TensorRT is missing or rejected the network; the message says what and where."""
