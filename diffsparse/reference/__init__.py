"""The models the project trains and ships: the digits DiT (`model`), the digits data (`digits`), the feature
network that scores its samples (`featurenet`) and its model card (`modelcard`). May import `diffsparse.models`,
`diffsparse.evaluate.metrics` and below; `diffsparse.models.loading` imports only `reference.model`.
"""
