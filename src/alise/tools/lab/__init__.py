"""What the benchmark scripts in ``bench/`` share: `alise up` as real processes with a health
prober (``upcluster``), the services' own commands on free ports (``local_cluster``), the engine's
GPU timings and floors (``engine``), replayed requests (``replay``), compressed logs (``files``)."""
