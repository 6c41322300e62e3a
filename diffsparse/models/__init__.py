"""Models: the model handle (`ModelHandle`), `load_model` by name, folder or config, the sampling loops and the
caption embeddings of text-conditional models. May import `diffsparse.backbones`, `diffsparse.cache`,
`diffsparse.accounting`, `diffsparse.schedule` and the shipped reference model (`diffsparse.reference.model`).
"""
