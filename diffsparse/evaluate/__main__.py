"""`python -m diffsparse.evaluate`."""

from diffsparse.evaluate.command import main

main()
