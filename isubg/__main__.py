"""`python -m isubg` runs the same command line as the `isubg` console script."""

from isubg.cli import main

if __name__ == "__main__":
    main()
