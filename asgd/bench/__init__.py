"""``asgd bench``: the data path's benchmarks, each against a reference measured in the same run.

    asgd bench transport --params 1M --transport shm --vs torch-rpc --repeats 5
    asgd bench step --steps 600

``transport`` (transport.py, its references in reference.py) times push_pull through real
server processes against a raw ZeroMQ echo of the same bytes and torch RPC's parameter
server; ``step`` (step.py) splits a worker's step into compute and exchange, with and without
overlap. The longer and more special benchmarks are scripts in the repository's ``bench/``
folder; bench/README.md lists every benchmark of both homes, what each measures, against
what, and where its figures are (docs/performance.md).
"""
