"""The toy-2D study of the seed tutorial: datasets, models, training, evaluation, figures.
Run it with `python -m fastvae.toy2d` (see fastvae.toy2d.cli)."""
