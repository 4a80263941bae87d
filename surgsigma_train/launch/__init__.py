"""Launchers: torchrun with the trainer's exit codes passed through, and Slurm batch scripts."""
