"""The presets that ship with wdjax: one module per method (and the quickstart, vision and
translation pipelines), each with `get_config(hardware="cpu")`.

A command takes a preset by name, `wdjax distill wd:cpu`, or any config file by path,
`wdjax distill my_config.py:gpu`; `wdjax.config.load` resolves both.
"""
