"""``gpunet bench``: gpunet against the floors and peer frameworks, on the same work.

- ``workloads``: MLP training steps and single ops, one factory per framework (gpunet, the
  hand-written NumPy step, its GEMMs alone, PyTorch, JAX, HIPS autograd);
- ``timing``: CPU and CUDA-event timers, interleaved repeats, the GPU/CPU crossover;
- ``run``: which workloads run, in which order, with a progress bar;
- ``report``: the table, ``results.json``, ``results.md`` and ``bench.png``.

Nothing here is imported by ``import gpunet``; the peers are imported only when used.
Entry points: ``run.run(run.Config(...))`` and ``report.write``, or the command.
"""
