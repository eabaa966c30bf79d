"""The lowest layer, imported by every other: the config schema (config), the registration mechanism
(registry), the device mesh (sharding), metric writers and progress bars (metrics), orbax checkpoints
(checkpoint), and the output directories we own (outdir). Nothing here imports another layer."""
