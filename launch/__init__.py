"""Launch scripts: Cloud TPU pods (tpu_pod), SLURM GPU clusters (slurm) and local multi-process runs (local)."""
