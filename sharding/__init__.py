"""Device meshes, logical-axis rules, and shardings of parameters, state and batches."""
