"""`python -m learner`: see learner/cli.py."""
from learner.cli import main

if __name__ == "__main__":
    main()
