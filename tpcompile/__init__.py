"""tpcompile: tensor parallelism for unmodified PyTorch models, through torch.compile."""
