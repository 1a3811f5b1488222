"""Step capture and replay: ``gpunet.capture(step)`` records the backend calls a training step
makes and replays them, with no tape, Node or Tensor per op, on buffers the capture owns.

The contract (JAX's ``jit`` and PyTorch's CUDA graphs are the models):

- The first two calls with a new input signature (shapes, dtypes, devices of the tensor
  arguments, the other arguments' values, autocast's state at the call, and the ``training``
  mode of each module a recording read) run the step eagerly and record every backend call it
  makes: the forward through ``autodiff.apply``, the sweep's rules and leaf writes,
  everything else through ``autodiff.call``. The two recordings must agree (the same calls on
  the same shapes with the same parameters, reading the same persistent arrays), or
  ``CaptureError`` names the first difference: Python control flow that depends on values is
  never frozen silently.
- Later calls replay the second recording. Tensor arguments are copied into the capture's
  input buffers (the step never sees the caller's arrays, so nothing of the caller's is
  written); every array the step made lives on in the capture and is rewritten in place, so
  it keeps its address. Tensors the step returns are the capture's own and are valid until
  the next replay: copy them (``t.clone()``) to keep a value; they are detached. Python side
  effects of the step (appending to a list, printing) happen only on the recorded calls.
  ``module.training`` read while recording is a guard, as under torch.compile: a replay
  checks it (a mode the step set itself is not one), and a change records again or raises,
  as a new signature does. Other Python state the step reads (a flag, a global) is frozen
  at the recording. A signature that comes once and never again (a Python number that
  changes every call) makes the step record at every call: past ``max_captures`` such, one
  warning names the argument (pass it as a tensor). NumPy arrays and scalars as arguments
  are refused, naming them (pass tensors, Python numbers).
- The optimizers' updates (SGD, Adam, AdamW) are recorded with what changes between steps
  passed as ``autodiff.Dynamic`` (the group's lr and hyperparameters), an in-backward step's
  lr as ``autodiff.Live``: computed afresh at each replay, never frozen. Step counts (Adam's,
  momentum SGD's) are device arrays that the recorded update advances itself. Schedules,
  gradient clipping and another optimizer's step are *segments* (``autodiff.segment``): they
  run again as Python at each replay, with the gradients they saw put back. Dropout's draws
  are backend calls replayed from the same generator: fresh masks every replay, the same
  ones eager would draw.
- Replacing the arrays a capture recorded (an optimizer packing its buffers again,
  ``Module.to``), or step counts parting (a parameter without a gradient for a step falls
  behind the neighbours its update shared), makes the next call record again; replacing
  ``p.data`` by hand between replays is not seen (write into it instead). Tensor arguments
  must not require grad.
- While recording, anything that takes a value to the host (``.item()``, ``.numpy()``,
  ``bool``, ``float``, ``int``, ``tolist``, printing a tensor) or makes a shape from values
  (boolean-mask indexing) raises ``CaptureError`` naming the op and the user's line.

The modules, each one idea, in the order they import: ``recording`` (what a capture
hears, and how two recordings are compared), ``passes`` (fills written over dropped, plain
SGD folded), ``program`` (the replay: liveness, buffers, the generated launch list) and
``step`` (``capture``, ``CapturedStep``: signatures, arguments, refusals).
"""

from ..autodiff import CaptureError, refuse
from .step import CapturedStep, capture, graph_support

__all__ = ["CaptureError", "CapturedStep", "capture", "graph_support", "refuse"]
