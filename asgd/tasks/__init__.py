"""What is trained: the model registry, the data sets and their sharding, the task every
process builds alike, and evaluation."""
