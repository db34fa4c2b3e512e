"""Tooling beside the product: what measures and rehearses ALISE, never what serves it.

- ``alise.tools.trace``, ``alise.tools.conversations``: request traces (`alise trace`);
- ``alise.tools.sim``: the simulator (`alise sim`), the scheduler's own core driving the worker's
  own engine over a latency model;
- ``alise.tools.bench``: the load generator (`alise bench`, gRPC or OpenAI HTTP);
- ``alise.tools.lab``: what the scripts in ``bench/`` share (a local CPU cluster, GPU timings).

The product (core, scheduler, worker, predictor, http, cluster, client, the CLI's service commands)
never imports this package; a test proves it. Its own dependencies are the ``tools`` extra.
"""
