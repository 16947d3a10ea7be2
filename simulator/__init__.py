"""The deterministic simulator: N virtual workers and the server's real update code in one
process, in event order by simulated time.

    asgd experiment staleness --simulate --delay-model exponential --workers 16,64,256

    from simulator import Simulation, parse_delay
    summary = Simulation(cfg, parse_delay("pareto:1.5")).run()

A side of its own, beside ``server`` and ``worker``: it imports the server's store and
staleness control (``server.store``, ``server.staleness``) and the worker's step
(``asgd.tasks.step``), so nothing under ``asgd/`` imports a side; ``asgd experiment
--simulate`` hands over to it when it runs, as ``asgd server`` hands over to ``server``.

- ``delays``: the delay models (how long each virtual worker's steps take).
- ``engine``: ``Simulation``, the event loop.
- ``runs``: one simulated run as a run directory, and as an experiment's record.
"""
from simulator.delays import DelayModel, parse_delay
from simulator.engine import Simulation

__all__ = ["DelayModel", "Simulation", "parse_delay"]
