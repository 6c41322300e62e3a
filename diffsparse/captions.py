"""`python -m diffsparse.captions`: caption embeddings (`diffsparse.models.captions`). An entry point: nothing
imports it."""

from diffsparse.models.captions import main

if __name__ == "__main__":
    main()
