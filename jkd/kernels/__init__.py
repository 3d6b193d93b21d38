"""Pallas kernels, each module with its pure-jnp `<op>_reference` beside it."""
