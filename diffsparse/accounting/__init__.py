"""Accounting: MACs per unit and per trajectory, analytic from the number of fresh tokens, and the flop counter
that checks them. May import `diffsparse.backbones`; not the runtime (`diffsparse.cache`), so `Schedule.macs`
(pure data) can use it.
"""
