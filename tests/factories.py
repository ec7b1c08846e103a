"""Factories for ``python -m tpcompile explain module:factory`` tests: (model, example_args)."""
import llama


def meta_llama():
    """A Llama built on ``meta``: explain must not need memory for its parameters."""
    return llama.make_model(n_layers=2, device="meta")
