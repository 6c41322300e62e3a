"""`python -m diffsparse.evaluate`."""

from diffsparse.evaluate.harness import main

main()
