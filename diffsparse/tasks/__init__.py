"""Hydra glue only: what `train.py` and `infer.py` run, instantiated from the config. Imports the library; the
library never imports it.
"""

from diffsparse.tasks.flux_digits import train_flux_digits
from diffsparse.tasks.learn import learn_schedule
from diffsparse.tasks.prune import prune_model
from diffsparse.tasks.reference import train_feature_network, train_reference_model
from diffsparse.tasks.schedule import make_schedule
from diffsparse.tasks.search import search_schedule

# task name (the config's `task:`) -> what `train.py` runs
TRAIN_TASKS = {
    "schedule": make_schedule,
    "reference": train_reference_model,
    "feature_net": train_feature_network,
    "learn": learn_schedule,
    "search": search_schedule,
    "prune": prune_model,
    "flux_digits": train_flux_digits,
}
