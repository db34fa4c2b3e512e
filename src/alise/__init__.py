"""ALISE: an LLM inference server that schedules by predicted job length.

The SDK (``alise.client``), the ``alise`` command (``alise.cli``) and the generated stubs
(``alise.v1``) need only grpc and protobuf; the services (``alise.scheduler``,
``alise.worker``, ``alise.predictor``, ``alise.http``, ``alise.cluster``) hold the pure
scheduling core (``alise.core``) and need the server extra.
"""
