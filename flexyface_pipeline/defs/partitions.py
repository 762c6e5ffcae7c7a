import dagster as dg

# One partition per sweep. Sweeps appear over time (from the CLI, the UI or the schedule).
sweeps_partitions = dg.DynamicPartitionsDefinition(name="sweeps")
