"""Prewarm: learns the container images a cluster runs and keeps them pulled on every node."""
