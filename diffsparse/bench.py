"""`python -m diffsparse.bench`: the speed bench (`diffsparse.evaluate.bench`). An entry point: nothing imports it."""

from diffsparse.evaluate.bench_cli import main

if __name__ == "__main__":
    main()
