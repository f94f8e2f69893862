"""SiT transport (interpolants, loss, ODE/SDE samplers) and the ADM diffusion used by DiT."""
