"""The core of tunefleet: errors, the recipe schema, the batch math, the hardware a run goes to,
and the run directory's layout (file names, exit codes, environment variables, checkpoints).

It imports nothing else of tunefleet and no torch; every other layer builds on it
(tests/test_layers.py enforces this):

    core (launch/core)  <-  generators (launch/*.py, slurm/sbatch.py)  <-  runtime (distributed/)
        <-  command line (launch/cli.py, launch/workstation.py, launch/plan_inputs.py, slurm/{cli,job,status,submit}.py)
"""
