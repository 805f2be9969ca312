"""What sweep and bench share to run many independent jobs: the resumable results CSV and the executor."""
