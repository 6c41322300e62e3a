"""Learning a schedule (DiffSparse): the cost predictor, the straight-through choice, the Lightning module, its
conditions and losses. May import everything below it (`schedule`, `backbones`, `accounting`, `cache`, `models`,
`allocate`); nothing imports it but the evaluation and the Hydra tasks.
"""
