"""tunefleet.slurm: sbatch generation and submission (no torch import)."""
