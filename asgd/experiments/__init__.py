"""Research tooling: experiment specs and runner, measures, reports and plots, the reference
trainers (one plain process, DDP) and the straggler simulation."""
